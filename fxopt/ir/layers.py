"""Recognizing convolution and linear layers whose weights are constants: what folding and fusion rewrite."""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.errors import PassError
from fxopt.ir.meta import module_name
from fxopt.ir.program import Program
from fxopt.ir.traits import ADD, BATCH_NORM, DIV, MUL, SUB

__all__ = [
    "Affine",
    "Layer",
    "as_affine",
    "as_layer",
    "is_call",
    "is_constant",
    "is_number",
    "layer_matches",
    "require_matches",
    "WeightedLayer",
    "weighted_layers",
]

aten = torch.ops.aten


def is_call(node: object, *targets) -> bool:
    """Whether ``node`` is a ``call_function`` of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_constant(node: object) -> bool:
    """Whether ``node`` reads a parameter or buffer (a ``get_attr``)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def is_number(value: object) -> bool:
    """Whether ``value`` is a literal int or float argument (not a node, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_matches(node: fx.Node, pattern: str) -> bool:
    """Whether a layer ``node`` matches a user's glob: by module path (``encoder.layer.0.*``), node or weight name."""
    names = [module_name(node) or node.name, node.name] + [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    return any(fnmatch.fnmatchcase(str(n), pattern) for n in names)


def require_matches(program: Program, layers: list[fx.Node], patterns: Iterable[tuple[str, str]], listing: str) -> None:
    """Raise naming the option when one of ``(option, glob)`` matches none of ``layers``: a typo is not a no-op."""
    for option_name, pattern in patterns:
        if not any(layer_matches(node, pattern) for node in layers):
            example = next((module_name(n) for n in layers if module_name(n)), "layer1.0.conv1")
            raise PassError(
                f"{option_name} pattern {pattern!r} matches no layer of {program.name}; layers are named "
                f"by module path or weight name, e.g. {example!r} ({listing})"
            )


@dataclass(frozen=True)
class Layer:
    """An ``aten.convolution`` or ``aten.linear`` node with constant weight (and bias, if any)."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None

    @property
    def is_linear(self) -> bool:
        return self.node.target is aten.linear.default

    @property
    def transposed(self) -> bool:
        return not self.is_linear and bool(self.node.args[6])

    @property
    def groups(self) -> int:
        return 1 if self.is_linear else int(self.node.args[8])

    @property
    def stride(self) -> tuple[int, ...]:
        return () if self.is_linear else tuple(self.node.args[3])

    @property
    def padding(self) -> tuple[int, ...]:
        return () if self.is_linear else tuple(self.node.args[4])

    @property
    def dilation(self) -> tuple[int, ...]:
        return () if self.is_linear else tuple(self.node.args[5])

    @property
    def kind(self) -> str:
        return "linear" if self.is_linear else ("conv-transpose" if self.transposed else "conv")

    @property
    def channel_dim(self) -> int:
        """The dim of the output (and input) holding channels: 1 for convs, the last for linears."""
        return self.node.meta["val"].dim() - 1 if self.is_linear else 1

    def args_with(self, x: fx.Node, weight: fx.Node, bias: fx.Node | None) -> tuple:
        """This layer's arguments with another input, weight and bias."""
        args = list(self.node.args) + [None] * (3 - len(self.node.args))  # linear(x, w) has no bias argument
        args[:3] = x, weight, bias
        return tuple(args)


def as_layer(node: object) -> Layer | None:
    """The conv or linear ``node`` computes, when its weight (and bias) are constants."""
    if not is_call(node, aten.convolution.default, aten.linear.default):
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not is_constant(weight) or not (bias is None or is_constant(bias)):
        return None
    return Layer(node, weight, bias)


@dataclass(frozen=True)
class WeightedLayer:
    """A layer with a constant float weight that reads one activation: linear, conv, or ``addmm`` (GPT-2's Conv1D,
    a constant ``[in, out]`` weight)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    kind: str  # "linear", "conv" or "addmm"

    def weight_value(self, program: Program) -> torch.Tensor:
        """The weight as ``[out, in, *kernel]``."""
        weight = program.get_constant(self.weight.target)
        return weight.T if self.kind == "addmm" else weight

    @property
    def label(self) -> str:
        return module_name(self.node) or self.node.name


def weighted_layers(program: Program) -> tuple[list[WeightedLayer], list[tuple[fx.Node, str]]]:
    """Every layer with a constant float weight (quantization's and activation smoothing's candidates), and
    ``(node, why not)`` for the ones they cannot take."""
    found, refused = [], []
    for node in program.graph.nodes:
        layer = as_layer(node)
        if layer is not None:
            if layer.transposed:
                refused.append((node, "transposed convolutions are not supported"))
                continue
            found.append(
                WeightedLayer(node, node.args[0], layer.weight, layer.bias, "linear" if layer.is_linear else "conv")
            )
        elif (
            is_call(node, aten.addmm.default)
            and is_constant(node.args[2])
            and is_constant(node.args[0])
            and not node.kwargs
        ):  # GPT-2's Conv1D: bias + x @ W
            found.append(WeightedLayer(node, node.args[1], node.args[2], node.args[0], "addmm"))
    kept = []
    for target in found:
        weight, value = program.get_constant(target.weight.target), target.node.meta.get("val")
        if not weight.is_floating_point() or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            refused.append((target.node, "its weight or output is not floating point"))
        else:
            kept.append(target)
    return kept, refused


@dataclass
class Affine:
    """``out = x * scale + shift`` with per-channel ``scale``/``shift`` along one dim of ``x``.

    ``coefficients(zeros, *params)`` computes ``(scale, shift)`` as float32
    vectors shaped like ``zeros`` (one per channel, on the weights' device) from
    the tensors of ``params`` (``get_attr`` nodes); ``dim`` is the channel dim,
    or ``None`` when any dim works (a scalar).
    """

    kind: str
    x: fx.Node
    out: fx.Node
    nodes: list[fx.Node]
    params: list[fx.Node]
    coefficients: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dim: int | None

    def evaluate(self, program: Program, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` from the constants' current values: float32 vectors of length ``channels``."""
        values = [program.get_constant(p.target) for p in self.params]
        return self.coefficients(torch.zeros(channels, dtype=torch.float32, device=device), *values)


def as_affine(program: Program, node: fx.Node) -> Affine | None:
    """The per-channel affine ``node`` computes (eval-mode BatchNorm, ``*``/``/``/``+``/``-`` by a constant), if any."""
    if is_call(node, operator.getitem) and is_call(node.args[0], BATCH_NORM) and node.args[1] == 0:
        return _batch_norm(node)
    if not is_call(node, *MUL, *DIV, *ADD, *SUB) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    if node.target in MUL + ADD and not _is_activation(a):
        a, b = b, a  # c * x, c + x
    if not _is_activation(a):
        return None
    constant = _constant_vector(program, node, a, b)
    if constant is None:
        return None
    value, dim, param = constant
    multiplies, inverts = node.target in MUL + DIV, node.target in DIV + SUB
    if node.target in DIV and (value == 0).any():
        return None  # x / 0 is inf or nan; a folded weight * inf is not the same

    def coefficients(zeros, *params):
        c = zeros + (params[0].float().reshape(-1) if param is not None else float(value))
        if inverts:
            c = 1 / c if multiplies else -c
        return (c, zeros) if multiplies else (zeros + 1, c)

    kind = {
        **dict.fromkeys(MUL, "mul"),
        **dict.fromkeys(DIV, "div"),
        **dict.fromkeys(ADD, "add"),
        **dict.fromkeys(SUB, "sub"),
    }[node.target]
    return Affine(kind, a, node, [node], [param] if param is not None else [], coefficients, dim)


def _is_activation(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr"


def _constant_vector(program: Program, node: fx.Node, x: fx.Node, c: object):
    """``(value, channel dim, get_attr node)`` when ``c`` is a scalar or a per-channel constant for ``x``.

    The channel dim is ``None`` when ``c`` is the same for every channel.
    """
    out, val = node.meta.get("val"), x.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(val, torch.Tensor) or out.shape != val.shape:
        return None
    if is_number(c):
        return torch.tensor(float(c)), None, None
    if not is_constant(c):
        return None
    tensor = program.get_constant(c.target)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() > val.dim():
        return None
    shape = (1,) * (val.dim() - tensor.dim()) + tuple(tensor.shape)
    varying = [d for d, size in enumerate(shape) if size != 1]
    if len(varying) > 1:
        return None
    return tensor, (varying[0] if varying else None), c


def _batch_norm(node: fx.Node) -> Affine | None:
    bn = node.args[0]
    x, gamma, beta, mean, var, _momentum, eps = bn.args
    if len(bn.users) != 1 or not all(p is None or is_constant(p) for p in (gamma, beta)):
        return None
    if not (is_constant(mean) and is_constant(var)):
        return None
    has_gamma, has_beta = gamma is not None, beta is not None

    def coefficients(_zeros, *params):
        it = iter(params)
        g = next(it) if has_gamma else None
        b = next(it) if has_beta else None
        running_mean, running_var = next(it), next(it)
        scale = torch.rsqrt(running_var.float() + eps)
        if g is not None:
            scale = scale * g.float()
        shift = -running_mean.float() * scale
        if b is not None:
            shift = shift + b.float()
        return scale, shift

    params = [p for p in (gamma, beta) if p is not None] + [mean, var]
    return Affine("batch-norm", x, node, [node, bn], params, coefficients, 1)
