"""fxopt: a compiler-style graph optimizer for PyTorch models.

>>> import fxopt
>>> fast = fxopt.optimize(model, example_inputs, target="cpu", pipeline="default")
>>> fast(*example_inputs)            # called like the model
>>> print(fast.report())             # what each pass did, and the error against the original
"""

from fxopt.api import OptimizedModel, optimize
from fxopt.codegen.export import load, program_weights
from fxopt.codegen.tune import TuneOptions
from fxopt.errors import (
    CaptureError,
    CodegenError,
    FxoptError,
    InputMismatchError,
    PassError,
    PipelineError,
    VerificationError,
)
from fxopt.ir import Program, capture
from fxopt.passes import PASSES, Pass, PassManager, Pipeline, Tolerance, register_pass
from fxopt.report import Report
from fxopt.targets import Target, parse_target
from fxopt.version import __version__ as __version__

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
