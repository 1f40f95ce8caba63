"""quantize: post-training quantization of linear and conv layers to int8, int4, fp8 and bfloat16 kernels, and of
attention to int8.

The pass holds the options; :mod:`fxopt.quant` does the work (formats, observers, GPTQ, the plan and the rewrite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fxopt.ir.meta import describe_node
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.quant.attention import attention_layers, calibrate_attention, rewrite_attention
from fxopt.quant.observers import ObserverKind
from fxopt.quant.plan import candidates, choose
from fxopt.quant.rewrite import STATIC, WEIGHT_ONLY, Precision, Scheme

__all__ = ["Quantize"]


@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize linear and conv layers (attention too: ``attention=int8``): explicit quantized ops run as kernels.

    ``scheme``: ``w8a8`` static int8 (symmetric per-output-channel weights,
    per-tensor activations over the range the ``observer`` picks on the
    calibration data); ``w8a8-dynamic`` (int8 weights, each token's scale
    computed at run time; linears); ``w8`` / ``w4`` weight-only, one scale per
    ``group-size`` inputs (linears; 4-bit weights packed two per byte);
    ``fp8`` e4m3 weights and calibrated activations (simulated in float32
    where the hardware has no fp8); ``bf16``: bfloat16 weights, activations
    rounded to bfloat16, float32 sums (linears; no calibration); ``mixed``: the first precision of ``mix``
    for most layers, the second (``float``: left alone) for the most
    sensitive ones, as few as keep the output error on the calibration data
    within ``max-error``. Weights become int8, packed int4 or fp8 tensors: the
    model is smaller as well as integer. ``attention=int8``: each attention's
    Q, K and V on int8 levels (one scale per head, calibrated on the
    quantized model), its softmax weights on 8-bit levels and both matmuls
    integer sums (``fxopt::attention_q``); each one's output error on the
    calibration data is in the pass's notes.

    Not exact: every value moves by at most half a quantization step (fp8: 2⁻⁴
    of its magnitude, bf16: 2⁻⁸) within the calibrated range; the pass record
    shows the output error. Runs after the exact rewrites that change weights
    (``fold-conv-bn``, ``fuse-blocks``, ``smooth-activations``, ``awq``) and before
    ``convert-layout`` (which blocks the quantized convolutions, not float ones this pass would not see) and
    ``cse``/``dce``.
    """

    name = "quantize"
    exact = False
    before = ("convert-layout",)

    scheme: Scheme = option("w8a8", "number formats of weights and activations")
    observer: ObserverKind = option("minmax", "how static activation ranges are chosen from calibration data")
    percentile: float = option(99.99, "observer=percentile: the percentile of values kept in range")
    group_size: int = option(128, "w8/w4: input weights per scale (0: one scale per output channel)")
    activations: Literal["asymmetric", "symmetric"] = option("asymmetric", "w8a8: static activation zero points")
    weights: Literal["symmetric", "asymmetric"] = option("symmetric", "w8/w4: weight group zero points")
    rounding: Literal["nearest", "gptq"] = option(
        "nearest", "w8/w4: round to nearest, or GPTQ's error-compensating rounding (calibrated)"
    )
    weight_ranges: Literal["minmax", "search"] = option(
        "minmax", "w8/w4: each group's min/max, or the clipped range with the least output error (calibrated)"
    )
    mix: tuple[Precision, ...] = option(
        ("w8a8", "float"), "scheme=mixed: the precision of most layers, then the one the most sensitive keep"
    )
    max_error: float = option(
        0.05, "scheme=mixed: output error allowed on the calibration data (relative RMS, or the calibration's metric)"
    )
    ignore: tuple[str, ...] = option((), "layers left in float (module path or weight name globs)")
    attention: Literal["float", "int8"] = option(
        "float", "int8: attention's Q·Kᵀ and P·V on int8 levels (per-head scales, calibrated); error in the notes"
    )
    weight_bits: int = option(
        8, "w8a8: the int8 weights' range in bits (7: within ±63, which AVX2 CPUs without VNNI multiply 1.4x faster)"
    )

    def __post_init__(self):
        if self.group_size < 0:
            raise ValueError(f"group-size must be 0 (per output channel) or positive, got {self.group_size}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.scheme == "mixed" and (len(self.mix) != 2 or self.mix[0] == "float" or self.mix[0] == self.mix[1]):
            raise ValueError(
                f"mix takes two precisions, the low one first (e.g. [w4, w8] or [w8a8, float]); got {list(self.mix)}"
            )
        if self.max_error <= 0:
            raise ValueError(f"max-error must be positive, got {self.max_error}")
        if not 2 <= self.weight_bits <= 8:
            raise ValueError(f"weight-bits must be 2 to 8, got {self.weight_bits}")

    def calibration_need(self) -> str | None:
        if self.attention == "int8":
            return "quantize{attention=int8}"
        if self.scheme == "mixed":
            return "quantize{scheme=mixed}"
        if self.scheme in STATIC:
            return f"quantize{{scheme={self.scheme}}}"
        if self.scheme in WEIGHT_ONLY and (self.rounding == "gptq" or self.weight_ranges == "search"):
            return f"quantize{{{'rounding=gptq' if self.rounding == 'gptq' else 'weight-ranges=search'}}}"
        return None

    def apply(self, program: Program, ctx: PassContext) -> bool:
        attention = []
        if self.attention == "int8":  # found before the layers are rewritten: their nodes have metadata
            attention, refused = attention_layers(program)
            for node, why in refused:
                ctx.skip(describe_node(node), why)
        changed = self._quantize_layers(program, ctx)
        if attention:
            calibrate_attention(program, ctx.require_calibration("quantize{attention=int8}"), attention, ctx.progress)
            rewrite_attention(program, attention, self.name)
            program.graph_module.recompile()
            ctx.count("attention layers", len(attention))
            worst = max(attention, key=lambda layer: layer.error)
            mean = sum(layer.error for layer in attention) / len(attention)
            ctx.notes.append(
                f"{len(attention)} attention layers to int8: output error on the calibration data (relative RMS, "
                f"each layer alone) mean {mean:.3g}, worst {worst.error:.3g} ({describe_node(worst.node)})"
            )
        return changed or bool(attention)

    def _quantize_layers(self, program: Program, ctx: PassContext) -> bool:
        chosen = candidates(program, self, ctx)
        if not chosen:
            return False
        plan, assignment, _ = choose(self, program, ctx, chosen, rank=False)
        quantized = [t for t in chosen if assignment[t.node.name] != "float"]
        if not quantized:
            return False
        before = sum(program.get_constant(t.weight.target).nbytes for t in quantized)
        after = sum(t.nbytes for t in plan.rewrite(program, assignment))
        for target in quantized:
            ctx.count(f"{target.kind} layers")
        schemes = "/".join(dict.fromkeys(s for s in assignment.values() if s != "float"))
        ctx.notes.append(f"{len(quantized)} layers to {schemes}: weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
        return True
