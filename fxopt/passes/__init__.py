"""Graph passes and the pass registry.

Every pass is a frozen dataclass in a file of its own; :data:`PASSES` (``registry.py``) maps each pass's spec
name to its class and is the one place a pass is registered: built-in ones there, a user's with
:func:`register_pass`.
"""

from fxopt.ir.numerics import Tolerance
from fxopt.passes.base import Option, Pass, PassContext, option
from fxopt.passes.manager import PassManager, PassRecord
from fxopt.passes.pipeline import Pipeline
from fxopt.passes.registry import BUILTIN_PIPELINES, PASSES, register_pass
from fxopt.passes.spec import parse_pipeline

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
