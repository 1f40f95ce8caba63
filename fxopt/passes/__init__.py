"""Graph passes and the pass registry.

Every pass is a frozen dataclass in a file of its own; :data:`PASSES` (``registry.py``) maps each pass's spec
name to its class and is the one place a pass is registered: built-in ones there, a user's with
:func:`register_pass`. The names below are imported on first use (:mod:`fxopt.lazy`), so the algorithm packages
(:mod:`fxopt.quant`, :mod:`fxopt.prune`) can use the pass interface (:mod:`fxopt.passes.base`) without loading
every pass.
"""

from typing import TYPE_CHECKING

from fxopt.lazy import lazy_exports

if TYPE_CHECKING:
    from fxopt.ir.numerics import Tolerance
    from fxopt.passes.base import Option, Pass, PassContext, option
    from fxopt.passes.manager import PassManager, PassRecord
    from fxopt.passes.pipeline import Pipeline
    from fxopt.passes.registry import BUILTIN_PIPELINES, PASSES, register_pass
    from fxopt.passes.spec import parse_pipeline

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Tolerance": "fxopt.ir.numerics",
        "Option": "fxopt.passes.base",
        "Pass": "fxopt.passes.base",
        "PassContext": "fxopt.passes.base",
        "option": "fxopt.passes.base",
        "PassManager": "fxopt.passes.manager",
        "PassRecord": "fxopt.passes.manager",
        "Pipeline": "fxopt.passes.pipeline",
        "BUILTIN_PIPELINES": "fxopt.passes.registry",
        "PASSES": "fxopt.passes.registry",
        "register_pass": "fxopt.passes.registry",
        "parse_pipeline": "fxopt.passes.spec",
    },
)

__all__ = [
    "BUILTIN_PIPELINES",
    "PASSES",
    "Option",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "Pipeline",
    "Tolerance",
    "option",
    "parse_pipeline",
    "register_pass",
]
