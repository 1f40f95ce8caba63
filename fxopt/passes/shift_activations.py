"""shift-activations: center each activation channel read by linear layers (Outlier Suppression+ shifting)."""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.ir.edit import drop_unread_constants
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext
from fxopt.quant.equivalence import calibrated_readers, shift_channels

__all__ = ["ShiftActivations"]


@dataclass(frozen=True)
class ShiftActivations(Pass):
    """Subtract each activation channel's range midpoint, adding ``W @ shift`` to the reading layers' biases.

    Channels whose values sit asymmetrically (a LayerNorm's bias, a GELU's
    output) are centered on zero (Wei et al. 2023, Outlier Suppression+), so a
    symmetric range covers them with half the span. Midpoints come from the
    calibration data. Exact in float (rounding aside); the shift folds into a
    LayerNorm's bias before the layers, or is a ``sub`` the backend fuses into
    the quantization. Runs after the exact rewrites, before
    ``smooth-activations`` and ``quantize``.
    """

    name = "shift-activations"
    before = ("smooth-activations", "quantize")

    def calibration_need(self) -> str | None:
        return self.name

    def apply(self, program: Program, ctx: PassContext) -> bool:
        readers = calibrated_readers(program, lambda: ctx.require_calibration(self.name), ctx.progress)
        for x, layers, lo, hi in readers:
            shift_channels(program, x, layers, (lo + hi) / 2, self.name)
            ctx.count("shifted activations")
        if readers:
            drop_unread_constants(program)  # the weights it replaced
        return bool(readers)
