"""fxopt: a compiler-style graph optimizer for PyTorch models.

>>> import fxopt
>>> fast = fxopt.optimize(model, example_inputs, target="cpu", pipeline="default")
>>> fast(*example_inputs)            # called like the model
>>> print(fast.report())             # what each pass did, and the error against the original

The names below are imported on first use (:mod:`fxopt.lazy`): ``import fxopt`` loads neither TVM nor the passes.
"""

from typing import TYPE_CHECKING

from fxopt.errors import (
    CaptureError,
    CodegenError,
    FxoptError,
    InputMismatchError,
    PassError,
    PipelineError,
    VerificationError,
)
from fxopt.lazy import lazy_exports
from fxopt.version import __version__ as __version__

if TYPE_CHECKING:
    from fxopt.api import OptimizedModel, optimize
    from fxopt.codegen.export import load, program_weights
    from fxopt.codegen.tune import TuneOptions
    from fxopt.ir import Program, capture
    from fxopt.ir.numerics import Tolerance
    from fxopt.passes import PASSES, Pass, PassManager, Pipeline, register_pass
    from fxopt.report import Report
    from fxopt.targets import Target, parse_target

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "OptimizedModel": "fxopt.api",
        "optimize": "fxopt.api",
        "load": "fxopt.codegen.export",
        "program_weights": "fxopt.codegen.export",
        "TuneOptions": "fxopt.codegen.tune",
        "Program": "fxopt.ir",
        "capture": "fxopt.ir",
        "Tolerance": "fxopt.ir.numerics",
        "PASSES": "fxopt.passes",
        "Pass": "fxopt.passes",
        "PassManager": "fxopt.passes",
        "Pipeline": "fxopt.passes",
        "register_pass": "fxopt.passes",
        "Report": "fxopt.report",
        "Target": "fxopt.targets",
        "parse_target": "fxopt.targets",
    },
)

__all__ = [
    "PASSES",
    "CaptureError",
    "CodegenError",
    "FxoptError",
    "InputMismatchError",
    "OptimizedModel",
    "Pass",
    "PassError",
    "PassManager",
    "Pipeline",
    "PipelineError",
    "Program",
    "Report",
    "Target",
    "Tolerance",
    "TuneOptions",
    "VerificationError",
    "capture",
    "load",
    "optimize",
    "parse_target",
    "program_weights",
    "register_pass",
]
