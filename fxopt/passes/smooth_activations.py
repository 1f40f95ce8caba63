"""smooth-activations: migrate activation outliers into the weights of the linear layers reading them (SmoothQuant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.ir.edit import drop_unread_constants
from fxopt.ir.meta import describe_node
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.quant.equivalence import calibrated_readers, scale_channels

__all__ = ["SmoothActivations"]


@dataclass(frozen=True)
class SmoothActivations(Pass):
    """Divide each activation channel read by linear layers by ``s``, multiplying their weight columns by ``s``.

    ``s = max|x|^alpha / max|W|^(1 - alpha)`` per channel, from the
    calibration data (Xiao et al. 2023, SmoothQuant): outlier channels shrink
    so a per-tensor activation scale fits the rest, and the weights, quantized
    per output channel, take the difficulty. Exact in float (rounding aside);
    the division folds into a LayerNorm before the layers, or is a ``mul`` the
    backend fuses into the quantization. Runs after the exact rewrites and
    ``shift-activations``, before ``quantize``.
    """

    name = "smooth-activations"
    before = ("quantize",)

    alpha: float = option(0.5, "migration strength: 0 leaves activations alone, 1 moves all of their range")

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def calibration_need(self) -> str | None:
        return self.name

    def apply(self, program: Program, ctx: PassContext) -> bool:
        for x, layers, lo, hi in calibrated_readers(program, lambda: ctx.require_calibration(self.name), ctx.progress):
            act = torch.maximum(-lo, hi).double()
            weight = torch.stack([layer.weight_value(program).double().abs().amax(0) for layer in layers]).amax(0)
            if act.shape != weight.shape:
                ctx.skip(describe_node(x), "its channels are not the layers' inputs")
                continue
            scale = act.clamp_min(1e-5).pow(self.alpha) / weight.clamp_min(1e-5).pow(1 - self.alpha)
            scale = torch.where((act > 0) & (weight > 0), scale, torch.ones_like(scale)).clamp(1e-5, 1e5)
            scale_channels(program, x, layers, scale, self.name)
            ctx.count("smoothed activations")
        if not ctx.stats["smoothed activations"]:
            return False
        drop_unread_constants(program)  # the weights it replaced
        return True
