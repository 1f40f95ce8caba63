"""Rewriting layers to fxopt's quantized ops (:mod:`fxopt.quant.ops`) as a :class:`~fxopt.quant.plan.QuantPlan`
assigns them, with their weights quantized and stored in the program."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, erase_if_dead, inline_function, replace_node
from fxopt.ir.layers import WeightedLayer
from fxopt.ir.meta import stamp_provenance
from fxopt.ir.program import Program
from fxopt.quant import ops as _ops  # noqa: F401  (registers the ops this rewrite emits)
from fxopt.quant.formats import FP8, INT4, INT8, affine_params, pack_int4, quantize_tensor, signed_int8
from fxopt.quant.weights import gptq_groups, group_params

if TYPE_CHECKING:
    from fxopt.quant.plan import QuantPlan

__all__ = ["Scheme", "Precision", "WEIGHT_ONLY", "LINEAR_ONLY", "STATIC", "Rewriter"]

fxopt_ops = torch.ops.fxopt

Scheme = Literal["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "bf16", "mixed"]
Precision = Literal["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "bf16", "float"]
WEIGHT_ONLY = ("w8", "w4")
LINEAR_ONLY = ("w8a8-dynamic", "w8", "w4", "bf16")
STATIC = {"w8a8": INT8, "fp8": FP8}  # schemes with calibrated activation ranges, and their format


class Rewriter:
    """Replaces layers one by one, sharing each activation's quantize node between the layers reading it."""

    def __init__(self, program: Program, plan: QuantPlan):
        self.program, self.plan, self.options = program, plan, plan.options
        self.graph = program.graph
        self.quantized: dict[tuple[fx.Node, str], tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.stored: list[torch.Tensor] = []
        self.replaced: dict[fx.Node, fx.Node] = {}  # a layer read by a later one is replaced first

    def constant(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        return self.graph.get_attr(add_constant(self.program, tensor.contiguous(), hint))

    def replace(self, target: WeightedLayer, scheme: str) -> None:
        dtype = target.node.meta["val"].dtype
        hint = target.weight.target.replace(".", "_")
        key = (target.weight.target, scheme)
        if key not in self.plan.weights:
            self.plan.weights[key] = self._quantize_weight(target, scheme)
        weights = self.plan.weights[key]
        self.stored.append(weights[0])
        with self.graph.inserting_before(target.node):
            bias = target.bias
            if scheme == "bf16":
                x = self.replaced.get(target.x, target.x)
                new = self.graph.call_function(
                    fxopt_ops.linear_bf16.default, (x, self.constant(weights[0], f"{hint}_bf16"), bias)
                )
            elif scheme in WEIGHT_ONLY:
                stored, scale, zero_point = weights
                x = self.replaced.get(target.x, target.x)
                new = self.graph.call_function(
                    fxopt_ops.linear_wq.default,
                    (
                        x,
                        self.constant(stored, f"{hint}_q{scheme}"),
                        self.constant(scale, f"{hint}_scale"),
                        self.constant(zero_point, f"{hint}_zero_point"),
                        bias,
                        4 if scheme == "w4" else 8,
                    ),
                )
            else:
                wq, w_scale = weights
                quantized = (
                    *self._activation(target, scheme),
                    self.constant(wq, f"{hint}_q"),
                    self.constant(w_scale, f"{hint}_scale"),
                    bias,
                )
                if target.kind == "conv":
                    stride, padding, dilation, _transposed, _out_pad, groups = target.node.args[3:9]
                    new = self.graph.call_function(
                        fxopt_ops.conv_q.default,
                        (*quantized, list(stride), list(padding), list(dilation), groups, dtype),
                    )
                else:
                    new = self.graph.call_function(fxopt_ops.linear_q.default, (*quantized, dtype))
        stamp_provenance([new], self.options.name, [target.node])
        replace_node(target.node, new)
        erase_if_dead(target.weight)
        self.replaced[target.node] = new

    def _quantize_weight(self, target: WeightedLayer, scheme: str) -> tuple[torch.Tensor, ...]:
        """``(stored, scale, zero point)`` of a weight-only scheme's groups; ``(bfloat16,)``; ``(quantized,
        scale)`` per output channel for the others."""
        weight = target.weight_value(self.program)
        if scheme == "bf16":
            return (weight.to(torch.bfloat16),)
        if scheme not in WEIGHT_ONLY:
            fmt = FP8 if scheme == "fp8" else signed_int8(self.options.weight_bits)
            amax = weight.float().abs().amax(dim=tuple(range(1, weight.dim())))
            w_scale, _ = affine_params(-amax, amax, fmt, symmetric=True)
            return quantize_tensor(weight, w_scale.reshape(-1, *[1] * (weight.dim() - 1)), None, fmt), w_scale
        fmt = INT4 if scheme == "w4" else INT8
        group = self.options.group_size or weight.shape[1]
        symmetric = self.options.weights == "symmetric"
        hessian = self.plan.hessians.get(target.x.name)
        if self.options.rounding == "gptq":
            q, scale, zero_point = gptq_groups(
                weight, hessian, group, fmt, symmetric, self.options.weight_ranges == "search"
            )
        else:
            q, scale, zero_point = group_params(weight, group, fmt, symmetric, hessian)
        return pack_int4(q) if fmt is INT4 else q, scale, zero_point

    def _activation(self, target: WeightedLayer, scheme: str) -> tuple[fx.Node, fx.Node, fx.Node]:
        """The quantized activation and its scale and zero point (shared by every layer reading ``target.x``
        at ``scheme``)."""
        original = target.x  # what calibration observed, and the key shared by its readers
        if (original, scheme) in self.quantized:
            return self.quantized[original, scheme]
        x = self.replaced.get(original, original)
        hint = f"{x.name}_act"
        if scheme == "w8a8-dynamic":
            value = original.meta["val"]  # a replacement layer has no metadata until the pass ends
            example = torch.zeros(value.shape, dtype=value.dtype)
            (scale,), created = inline_function(self.graph, _token_scale, [x], [example], target.node)
            stamp_provenance(created, self.options.name, [x])
            zero_point = self.constant(torch.zeros((), dtype=torch.int32), f"{hint}_zero_point")
            fmt = INT8
        else:
            fmt = STATIC[scheme]
            lo, hi = self.plan.ranges[fmt.name][original.name]
            scale_value, zero_value = affine_params(
                torch.tensor(lo), torch.tensor(hi), fmt, symmetric=self.options.activations == "symmetric"
            )
            scale = self.constant(scale_value, f"{hint}_scale")
            zero_point = self.constant(zero_value, f"{hint}_zero_point")
        xq = self.graph.call_function(fxopt_ops.quantize.default, (x, scale, zero_point, fmt.name))
        stamp_provenance([xq], self.options.name, [x])
        self.quantized[original, scheme] = (xq, scale, zero_point)
        return xq, scale, zero_point


def _token_scale(x: torch.Tensor) -> tuple[torch.Tensor]:
    """Symmetric int8 scale of each token (row of the last dim), computed at run time."""
    return (x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / INT8.symmetric_max,)
