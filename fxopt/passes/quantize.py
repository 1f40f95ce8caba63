"""quantize: post-training quantization of linear and conv layers to int8, int4 and fp8 kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.errors import PassError
from fxopt.ir.edit import add_constant, drop_unread_constants, erase_if_dead, inline_function, replace_node
from fxopt.ir.equivalence import input_moments
from fxopt.ir.layers import WeightedLayer, layer_matches, require_matches, weighted_layers
from fxopt.ir.meta import describe_node, has_symbolic_shapes, propagate_meta, stamp_provenance
from fxopt.ir.observers import ObserverKind, calibrate_ranges
from fxopt.ir.program import Program
from fxopt.ir.calibration import observe
from fxopt.ir.quant import FP8, INT4, INT8, affine_params, gptq_groups, group_params, pack_int4, quantize_tensor
from fxopt.passes.base import Pass, PassContext, option

__all__ = ["Quantize", "Scheme"]

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt

Scheme = Literal["w8a8", "w8a8-dynamic", "w8", "w4", "fp8"]
_WEIGHT_ONLY = ("w8", "w4")
_LINEAR_ONLY = ("w8a8-dynamic", "w8", "w4")


@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize linear and conv layers: explicit quantized ops that the backend runs as integer or fp8 kernels.

    ``scheme``: ``w8a8`` static int8 (symmetric per-output-channel weights,
    per-tensor activations over the range the ``observer`` picks on the
    calibration data); ``w8a8-dynamic`` (int8 weights, each token's scale
    computed at run time; linears); ``w8`` / ``w4`` weight-only, one scale per
    ``group-size`` inputs (linears; 4-bit weights packed two per byte);
    ``fp8`` e4m3 weights and calibrated activations (simulated in float32
    where the hardware has no fp8). Weights become int8, packed int4 or fp8
    tensors: the model is smaller as well as integer.

    Not exact: every value moves by at most half a quantization step (fp8: 2⁻⁴
    of its magnitude) within the calibrated range; the pass record shows the
    output error. Runs after the exact rewrites that change weights
    (``fold-conv-bn``, ``fuse-blocks``, ``smooth-activations``, ``awq``) and before
    ``cse``/``dce``.
    """

    name = "quantize"
    exact = False

    scheme: Scheme = option("w8a8", "number formats of weights and activations")
    observer: ObserverKind = option("minmax", "how static activation ranges are chosen from calibration data")
    percentile: float = option(99.99, "observer=percentile: the percentile of values kept in range")
    group_size: int = option(128, "w8/w4: input weights per scale (0: one scale per output channel)")
    activations: Literal["asymmetric", "symmetric"] = option("asymmetric", "w8a8: static activation zero points")
    weights: Literal["symmetric", "asymmetric"] = option("symmetric", "w8/w4: weight group zero points")
    rounding: Literal["nearest", "gptq"] = option("nearest", "w8/w4: round to nearest, or GPTQ's error-compensating "
                                                  "rounding (calibrated)")
    weight_ranges: Literal["minmax", "search"] = option("minmax", "w8/w4: each group's min/max, or the clipped range "
                                                        "with the least output error (calibrated)")
    ignore: tuple[str, ...] = option((), "layers left in float (module path or weight name globs)")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        self._validate()
        if has_symbolic_shapes(program.graph):
            ctx.skip("the graph", "it has dynamic (symbolic) dimensions; capture with static shapes to quantize")
            return False
        targets, refused = weighted_layers(program)
        for node, why in refused:
            ctx.skip(describe_node(node), why)
        require_matches(program, [t.node for t in targets], [("ignore", p) for p in self.ignore],
                        "`fxopt quantize --report` lists them")
        chosen = []
        for target in targets:
            why = self._refusal(program, target)
            if why is not None:
                ctx.skip(describe_node(target.node), why)
            else:
                chosen.append(target)
        if not chosen:
            return False
        ranges, hessians = {}, {}
        if self.scheme in _WEIGHT_ONLY and (self.rounding == "gptq" or self.weight_ranges == "search"):
            needs = "rounding=gptq" if self.rounding == "gptq" else "weight-ranges=search"
            calibration = ctx.require_calibration(f"quantize{{{needs}}}")
            moments = input_moments(program, calibration, dict.fromkeys(t.x for t in chosen), ctx.progress)
            hessians = {x: second for x, (second, _) in moments.items()}
        if self.scheme in ("w8a8", "fp8"):
            calibration = ctx.require_calibration(f"quantize{{scheme={self.scheme}}}")
            fmt = FP8 if self.scheme == "fp8" else INT8
            ranges = calibrate_ranges(program, calibration, dict.fromkeys(t.x for t in chosen), self.observer, fmt,
                                      symmetric=self.activations == "symmetric", percentile=self.percentile,
                                      progress=ctx.progress)
        before = sum(program.get_constant(t.weight.target).nbytes for t in chosen)
        rewriter = _Rewriter(program, self, ranges, hessians)
        for target in chosen:
            rewriter.replace(target)
            ctx.count(f"{target.kind} layers")
        propagate_meta(program.graph_module)
        drop_unread_constants(program)
        after = sum(t.nbytes for t in rewriter.weights)
        ctx.notes.append(f"{len(chosen)} layers to {self.scheme}: weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
        return True

    def _validate(self) -> None:
        if self.group_size < 0:
            raise PassError(f"quantize: group-size must be 0 (per output channel) or positive, got {self.group_size}")
        if not 0 < self.percentile <= 100:
            raise PassError(f"quantize: percentile must be in (0, 100], got {self.percentile}")

    def _refusal(self, program: Program, target: WeightedLayer) -> str | None:
        if any(layer_matches(target.node, p) for p in self.ignore):
            return f"ignored ({target.label})"
        if target.kind == "conv" and self.scheme in _LINEAR_ONLY:
            return f"scheme {self.scheme} quantizes linear layers only"
        if self.scheme in _WEIGHT_ONLY:
            in_features = target.weight_value(program).shape[1]
            group = self.group_size or in_features
            if in_features % group:
                return f"its {in_features} inputs are not a multiple of group-size {group}"
            if self.scheme == "w4" and in_features % 2:
                return f"its {in_features} inputs are odd; 4-bit weights pack two per byte"
        return None


class _Rewriter:
    """Replaces layers one by one, sharing each activation's quantize node between the layers reading it."""

    def __init__(self, program: Program, options: Quantize, ranges: dict[fx.Node, tuple[float, float]],
                 hessians: dict[fx.Node, torch.Tensor]):
        self.program, self.options, self.ranges, self.hessians = program, options, ranges, hessians
        self.graph = program.graph
        self.quantized: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.weights: list[torch.Tensor] = []
        self.replaced: dict[fx.Node, fx.Node] = {}  # a layer read by a later one is replaced first

    def constant(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        return self.graph.get_attr(add_constant(self.program, tensor.contiguous(), hint))

    def replace(self, target: WeightedLayer) -> None:
        scheme = self.options.scheme
        dtype = target.node.meta["val"].dtype
        weight = target.weight_value(self.program)
        hint = target.weight.target.replace(".", "_")
        with self.graph.inserting_before(target.node):
            bias = target.bias
            if scheme in _WEIGHT_ONLY:
                args = self._weight_only(self.hessians.get(target.x), weight, hint)
                x = self.replaced.get(target.x, target.x)
                new = self.graph.call_function(fxopt_ops.linear_wq.default, (x, *args[:3], bias, args[3]))
            else:
                xq, x_scale, x_zero_point = self._activation(target)
                fmt = FP8 if scheme == "fp8" else INT8
                amax = weight.float().abs().amax(dim=tuple(range(1, weight.dim())))
                w_scale, _ = affine_params(-amax, amax, fmt, symmetric=True)
                wq = quantize_tensor(weight, w_scale.reshape(-1, *[1] * (weight.dim() - 1)), None, fmt)
                self.weights.append(wq)
                quantized = (xq, x_scale, x_zero_point, self.constant(wq, f"{hint}_q"),
                             self.constant(w_scale, f"{hint}_scale"), bias)
                if target.kind == "conv":
                    stride, padding, dilation, _transposed, _out_pad, groups = target.node.args[3:9]
                    new = self.graph.call_function(fxopt_ops.conv_q.default, (
                        *quantized, list(stride), list(padding), list(dilation), groups, dtype))
                else:
                    new = self.graph.call_function(fxopt_ops.linear_q.default, (*quantized, dtype))
        stamp_provenance([new], self.options.name, [target.node])
        replace_node(target.node, new)
        erase_if_dead(target.weight)
        self.replaced[target.node] = new

    def _weight_only(self, hessian: torch.Tensor | None, weight: torch.Tensor, hint: str) -> tuple:
        fmt = INT4 if self.options.scheme == "w4" else INT8
        group = self.options.group_size or weight.shape[1]
        symmetric = self.options.weights == "symmetric"
        search = self.options.weight_ranges == "search"
        if self.options.rounding == "gptq":
            q, scale, zero_point = gptq_groups(weight, hessian, group, fmt, symmetric, search)
        else:
            q, scale, zero_point = group_params(weight, group, fmt, symmetric, hessian if search else None)
        stored = pack_int4(q) if fmt is INT4 else q
        self.weights.append(stored)
        return (self.constant(stored, f"{hint}_q{fmt.name}"), self.constant(scale, f"{hint}_scale"),
                self.constant(zero_point, f"{hint}_zero_point"), 4 if fmt is INT4 else 8)

    def _activation(self, target: WeightedLayer) -> tuple[fx.Node, fx.Node, fx.Node]:
        """The quantized activation and its scale and zero point (shared by every layer reading ``target.x``)."""
        original = target.x  # what calibration observed, and the key shared by its readers
        if original in self.quantized:
            return self.quantized[original]
        x = self.replaced.get(original, original)
        hint = f"{x.name}_act"
        if self.options.scheme == "w8a8-dynamic":
            value = original.meta["val"]  # a replacement layer has no metadata until the pass ends
            example = torch.zeros(value.shape, dtype=value.dtype)
            (scale,), created = inline_function(self.graph, _token_scale, [x], [example], target.node)
            stamp_provenance(created, self.options.name, [x])
            zero_point = self.constant(torch.zeros((), dtype=torch.int32), f"{hint}_zero_point")
            fmt = INT8
        else:
            lo, hi = self.ranges[original]
            fmt = FP8 if self.options.scheme == "fp8" else INT8
            scale_value, zero_value = affine_params(torch.tensor(lo), torch.tensor(hi), fmt,
                                                    symmetric=self.options.activations == "symmetric")
            scale = self.constant(scale_value, f"{hint}_scale")
            zero_point = self.constant(zero_value, f"{hint}_zero_point")
        xq = self.graph.call_function(fxopt_ops.quantize.default, (x, scale, zero_point, fmt.name))
        stamp_provenance([xq], self.options.name, [x])
        self.quantized[original] = (xq, scale, zero_point)
        return xq, scale, zero_point


def _token_scale(x: torch.Tensor) -> tuple[torch.Tensor]:
    """Symmetric int8 scale of each token (row of the last dim), computed at run time."""
    return (x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / INT8.symmetric_max,)
