"""fxopt's one error hierarchy.

Every error fxopt raises on purpose is an :class:`FxoptError`. Messages name the
culprit (pass, option, node, op) and, where the model's source is known, the
file and line that produced it, then say what the user can do.
"""

from __future__ import annotations

__all__ = [
    "FxoptError",
    "CaptureError",
    "InputMismatchError",
    "PipelineError",
    "PassError",
    "VerificationError",
    "CodegenError",
    "first_line",
]


class FxoptError(Exception):
    """Base class of every error fxopt raises deliberately."""


class CaptureError(FxoptError):
    """The model could not be captured into fxopt's IR (export failed or is unsupported)."""


class InputMismatchError(FxoptError):
    """Inputs given to a captured or optimized model do not match what it was built for."""


class PipelineError(FxoptError):
    """A pipeline spec, option, named pipeline or pipeline file is invalid."""


class PassError(FxoptError):
    """A pass raised while rewriting; the input graph is left as it was."""


class VerificationError(FxoptError):
    """The IR is malformed, or an optimized graph no longer computes the original function."""


class CodegenError(FxoptError):
    """The backend could not lower or build the graph."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: the head of an exception from a library whose message runs on
    (TVM's C++ traceback, torch.load's advice) for a one-line error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
