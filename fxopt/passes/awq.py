"""awq: activation-aware scaling of weight channels before weight-only quantization (AWQ)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fxopt.errors import PipelineError
from fxopt.ir.edit import drop_unread_constants
from fxopt.ir.layers import WeightedLayer
from fxopt.ir.meta import describe_node
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.quant.equivalence import input_moments, linear_readers, scale_channels
from fxopt.quant.formats import INT4, INT8, dequantize_groups
from fxopt.quant.weights import group_params

__all__ = ["AWQ"]


@dataclass(frozen=True)
class AWQ(Pass):
    """Scale up the weight columns that meet large activations, dividing those activation channels by the same
    factor, so that weight-only quantization rounds the weights that matter most more finely.

    Per activation read by linear layers, ``s = mean|x|^a`` per channel (Lin et
    al. 2024, AWQ), normalized to a geometric mean of 1; ``a`` is searched on a
    ``grid`` over ``[0, 1]`` for the least squared error of the layers' outputs
    on the calibration data when their weights are quantized as ``quantize``
    will (``bits``, ``group-size`` and ``weights`` must match its options);
    ``a = 0`` leaves the channels alone. Exact in float (rounding aside); the
    division folds into a LayerNorm before the layers, or is a ``mul`` only
    they read. Runs after the exact rewrites, before ``quantize{scheme=w4}``
    (or ``w8``), with or without ``rounding=gptq``.
    """

    name = "awq"
    before = ("quantize",)

    bits: Literal[4, 8] = option(4, "weight bits of the quantize that follows (w4: 4, w8: 8)")
    group_size: int = option(128, "input weights per scale, as quantize's group-size (0: per output channel)")
    weights: Literal["symmetric", "asymmetric"] = option("symmetric", "group zero points, as quantize's weights")
    grid: int = option(20, "exponents tried between 0 and 1")

    def __post_init__(self):
        if self.group_size < 0:
            raise ValueError(f"group-size must be 0 (per output channel) or positive, got {self.group_size}")
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1, got {self.grid}")

    def calibration_need(self) -> str | None:
        return self.name

    def check_later(self, later: Sequence[Pass]) -> None:
        """The scales are searched for the rounding of the ``quantize`` that follows: its options must match."""
        quantize = next((p for p in later if p.name == "quantize"), None)
        if quantize is None:
            return
        scheme = quantize.mix[0] if quantize.scheme == "mixed" else quantize.scheme
        if scheme not in ("w4", "w8"):
            raise PipelineError(
                f"awq prepares weight-only quantization (w4/w8), but the quantize after it uses "
                f"{scheme}; drop awq or quantize with scheme=w4/w8"
            )
        expected = {"bits": int(scheme[1]), "group-size": quantize.group_size, "weights": quantize.weights}
        mismatched = [
            f"{k}={v} (quantize's: {expected[k]})"
            for k, v in (("bits", self.bits), ("group-size", self.group_size), ("weights", self.weights))
            if v != expected[k]
        ]
        if mismatched:
            raise PipelineError(
                f"awq's options do not match the quantize after it: {', '.join(mismatched)}; "
                f"give awq the same bits, group-size and weights"
            )

    def apply(self, program: Program, ctx: PassContext) -> bool:
        readers = linear_readers(program)
        chosen = {}
        for x, layers in readers.items():
            in_features = layers[0].weight_value(program).shape[1]
            group = self.group_size or in_features
            if in_features % group:
                ctx.skip(describe_node(x), f"its {in_features} channels are not a multiple of group-size {group}")
            else:
                chosen[x] = layers
        if not chosen:
            return False
        moments = input_moments(program, ctx.require_calibration(self.name), chosen, ctx.progress)
        errors, exponents = [], []
        for x, layers in chosen.items():
            exponent, scale, error = self._search(program, *moments[x], layers)
            errors.append(error)
            if exponent > 0:
                exponents.append(exponent)
                scale_channels(program, x, layers, scale, self.name)
                ctx.count("scaled activations")
        ctx.notes.append(
            f"layer output error after quantization: {sum(errors) / len(errors):.0%} of unscaled on average"
            + (f"; exponents {min(exponents):.2f}..{max(exponents):.2f}" if exponents else "")
        )
        if not exponents:
            return False
        drop_unread_constants(program)  # the weights it replaced
        return True

    @torch.no_grad()
    def _search(
        self, program: Program, hessian: torch.Tensor, magnitude: torch.Tensor, layers: list[WeightedLayer]
    ) -> tuple[float, torch.Tensor, float]:
        """``(exponent, scale, output error relative to unscaled)`` of the best exponent on the grid.

        The layers compute ``(x / s) Q(W s)ᵀ`` instead of ``x Wᵀ``: their output error is ``dᵀ H d`` per output
        row ``d`` of ``Q(W s) / s - W``, with ``H = E[x xᵀ]``.
        """
        weights = [layer.weight_value(program).float() for layer in layers]
        hessian, magnitude = hessian.float(), magnitude.float().clamp_min(1e-8)
        best, plain = None, None
        for step in range(self.grid + 1):
            exponent = step / self.grid
            scale = magnitude.pow(exponent)
            scale = scale / (scale.max() * scale.min()).sqrt()
            error = 0.0
            for w in weights:
                d = self._fake_quantize(w * scale) / scale - w
                error += float(((d @ hessian) * d).sum())
            plain = error if plain is None else plain
            if best is None or error < best[2]:
                best = (exponent, scale, error)
        exponent, scale, error = best
        return exponent, scale, error / plain if plain > 0 else 1.0

    def _fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        fmt = INT4 if self.bits == 4 else INT8
        group = self.group_size or weight.shape[1]
        return dequantize_groups(*group_params(weight, group, fmt, self.weights == "symmetric"))
