"""Folding of eval-mode BatchNorm and per-channel affine constants into convolutions and linear layers."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, inline_function, replace_subgraph
from fxopt.ir.meta import describe_node, propagate_meta, stamp_provenance
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten

_BATCH_NORM = aten._native_batch_norm_legit_no_training.default
# BatchNorm variants that normalize with the batch's own statistics: nothing constant to fold.
_BATCH_STATISTICS = (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
                     aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default)
_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_ADD = (aten.add.Tensor, aten.add.Scalar)
_SUB = (aten.sub.Tensor, aten.sub.Scalar)


@dataclass
class _Affine:
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
    params: list[fx.Node | None]
    coefficients: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dim: int | None


# A fold's result: ("folded", statistic), ("skipped", reason), or None when no layer is there.
_Outcome = tuple[str, str] | None


def _folded(outcome: _Outcome) -> bool:
    return outcome is not None and outcome[0] == "folded"


@dataclass
class _Layer:
    """A convolution or linear layer an affine can fold into: its weight/bias nodes and output channel dim."""

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


@dataclass(frozen=True)
class FoldConvBN(Pass):
    """Fold eval-mode BatchNorm, and multiplications/additions by per-channel constants, into convs and linears.

    After a layer: ``BN(conv(x))`` becomes one ``conv`` with scaled weights and
    a new bias, for Conv1d/2d/3d, transposed convs (whose weights hold output
    channels in dim 1, per group), grouped and depthwise convs, with or without
    bias, and ``BatchNorm1d`` after ``Linear`` (also through the
    ``transpose`` that puts a sequence's features on dim 1). ``conv(x) * c``,
    ``/ c``, ``+ c`` and ``- c`` with ``c`` a scalar or per-output-channel
    constant fold the same way.

    Before a layer: ``conv(BN(x))`` folds the scale into the weights and the
    shift into the bias, exactly only when the conv pads nothing: a padded
    border sees zeros rather than the shifted input, so with padding the fold
    would change the border and is skipped. ``linear(BN(x))`` always folds
    (features on the last dim). Transposed convs are not folded before: their
    border outputs sum fewer taps of the shift.

    Exact up to float rounding: the fold computes the same products in another
    order. Arithmetic runs in float32 and the results are cast back, so fp16 and
    bf16 models lose no precision to folding. Skips, with the reason in the
    pass statistics: a layer output that other nodes also read, BatchNorm that
    uses batch statistics (no running stats), non-constant parameters, a
    channel or dtype mismatch, folded fp16 weights that would overflow.

    ``mode=deploy`` folds into new constant weights. ``mode=tune`` (Efficient
    ConvBN Blocks, Huang et al. 2023) keeps weights trainable: the layer
    computes its weight and bias from the original layer and BatchNorm
    parameters at run time, costing about one conv while gradients reach every
    parameter; do not follow it with ``fold-constants`` if you mean to train.

    Run after ``remove-noops`` and ``fold-constants`` (which expose the
    patterns) and before ``cse`` and ``dce`` (which drop the replaced constants).
    """

    name = "fold-conv-bn"
    mode: Literal["deploy", "tune"] = option("deploy", "deploy: constant weights; tune: weights computed at run time")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        changed = False
        # One fold per scan: a fold can expose the next one (conv -> BN -> scale).
        while self._fold_one(program, ctx):
            changed = True
        if changed:
            program.graph_module.recompile()
            propagate_meta(program.graph_module)
        return changed

    def _fold_one(self, program: Program, ctx: PassContext) -> bool:
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target in _BATCH_STATISTICS and _next_to_a_layer(node):
                _note_once(ctx, node, "BatchNorm normalizes with batch statistics (no running stats): not constant")
                continue
            affine = _affine(program, node)
            if affine is None:
                continue
            outcomes = [self._fold_after(program, affine)]
            if not _folded(outcomes[0]):
                outcomes.append(self._fold_before(program, affine))
            if _folded(outcomes[-1]):
                ctx.count(outcomes[-1][1])
                return True
            reasons = [reason for _, reason in filter(None, outcomes)]
            if reasons or affine.kind == "batch-norm":  # a constant scale only matters next to a layer
                _note_once(ctx, affine.out, reasons[0] if reasons else "no conv or linear next to it to fold into")
        return False

    # ------------------------------------------------------------------ layer(x) -> affine

    def _fold_after(self, program: Program, affine: _Affine) -> _Outcome:
        """Fold into the layer producing the affine's input."""
        chain, source = [], affine.x
        while _is_call(source, aten.permute.default):
            chain.append(source)
            source = source.args[0]
        layer = _layer(source)
        if layer is None:
            return None
        if any(len(n.users) > 1 for n in [layer.node, *chain]):
            return "skipped", f"the {_layer_kind(layer)} output has other users"
        ndim = layer.node.meta["val"].dim()
        channel = ndim - 1 if layer.is_linear else 1
        dim = affine.dim
        for permute in chain:  # map the affine's channel dim back through the permutes
            dim = None if dim is None else permute.args[1][dim] % ndim
        if dim is not None and dim != channel:
            return "skipped", f"{affine.kind} scales dim {affine.dim}, the {_layer_kind(layer)}'s channels are another dim"
        if (problem := _dtype_problem(affine, layer)) is not None:
            return "skipped", problem
        channels = layer.node.meta["val"].shape[channel]
        coefficients, transposed, groups = affine.coefficients, layer.transposed, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w = weight.float()
            if transposed:  # weight [in, out/groups, *k]: the output channel is (group, dim 1)
                shape = (groups, 1, channels // groups) + (1,) * (w.dim() - 2)
                w = (w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) * scale.reshape(shape)).reshape(w.shape)
            else:
                w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
            b = shift if bias is None else bias.float() * scale + shift
            return w.to(weight.dtype), b.to(weight.dtype)

        if overflow := self._replace(program, affine, layer, fold, chain):
            return "skipped", overflow
        return "folded", f"{affine.kind}-into-{_layer_kind(layer)}"

    # ------------------------------------------------------------------ affine -> layer(x)

    def _fold_before(self, program: Program, affine: _Affine) -> _Outcome:
        """Fold into the layer reading the affine's output."""
        if len(affine.out.users) != 1:
            return None
        (consumer,) = affine.out.users
        layer = _layer(consumer)
        if layer is None or consumer.args[0] is not affine.out:
            return None
        if layer.transposed:
            return "skipped", "a transposed conv after it sums fewer taps at the border"
        if not layer.is_linear and any(consumer.args[4]):
            return "skipped", "the conv after it pads its input, so the border would change"
        ndim = affine.x.meta["val"].dim()
        channel = ndim - 1 if layer.is_linear else 1
        if affine.dim is not None and affine.dim != channel:
            return "skipped", f"{affine.kind} scales dim {affine.dim}, the {_layer_kind(layer)} reads channels on dim {channel}"
        if (problem := _dtype_problem(affine, layer)) is not None:
            return "skipped", problem
        channels = affine.x.meta["val"].shape[channel]
        coefficients, groups = affine.coefficients, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w = weight.float()
            out, per_group = w.shape[0], channels // groups
            # weight [out, in/groups, *k]: input channel ci of output o's group g is g * in/groups + ci
            grouped = w.reshape(groups, out // groups, per_group, -1)
            w_scaled = grouped * scale.reshape(groups, 1, per_group, 1)
            b = (grouped * shift.reshape(groups, 1, per_group, 1)).sum((2, 3)).reshape(out)
            if bias is not None:
                b = b + bias.float()
            return w_scaled.reshape(w.shape).to(weight.dtype), b.to(weight.dtype)

        if overflow := self._replace(program, affine, layer, fold, [], layer_input=affine.x):
            return "skipped", overflow
        return "folded", f"{affine.kind}-into-following-{_layer_kind(layer)}"

    # ------------------------------------------------------------------ rewriting

    def _replace(self, program: Program, affine: _Affine, layer: _Layer, fold, chain: list[fx.Node],
                 layer_input: fx.Node | None = None) -> str | None:
        """Emit the layer with folded weight and bias in place of the layer, ``chain`` and the affine.

        Returns why not, leaving the graph alone, when the folded weights overflow their dtype.
        """
        graph = program.graph
        inputs = [layer.weight, layer.bias, *affine.params]
        root = affine.out if layer_input is None else layer.node  # the later of the two
        emitted = self._emit(program, fold, inputs, root)
        if isinstance(emitted, str):
            return emitted
        weight, bias, created = emitted
        args = list(layer.node.args) + [None] * (3 - len(layer.node.args))  # linear(x, w) has no bias argument
        args[0] = layer.node.args[0] if layer_input is None else layer_input
        args[1], args[2] = weight, bias
        with graph.inserting_before(root):
            result = graph.call_function(layer.node.target, tuple(args), dict(layer.node.kwargs))
            # Shapes are unchanged; later folds in this pass read them before metadata is re-propagated.
            result.meta["val"] = layer.node.meta["val"]
            created.append(result)
            for permute in reversed(chain):
                result = graph.call_function(aten.permute.default, (result, *permute.args[1:]))
                result.meta["val"] = permute.meta["val"]
                created.append(result)
        replaced = [layer.node, *chain, *affine.nodes]
        stamp_provenance(created, self.name, replaced)
        replace_subgraph(root, result, replaced + [n for n in inputs if n is not None])
        return None

    def _emit(self, program: Program, fold, inputs: list[fx.Node | None],
              root: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | str:
        """Nodes for the folded weight and bias (constants, or in tune mode ops on ``inputs``), and all nodes made;
        or why not: folded half-precision weights can overflow (a tiny running variance scales by thousands)
        where the unfolded model's activations did not."""
        present = [n for n in inputs if n is not None]

        def fold_present(*tensors):
            it = iter(tensors)
            return fold(*(None if n is None else next(it) for n in inputs))

        values = [program.get_constant(n.target) for n in present]
        with torch.no_grad():
            tensors = fold_present(*values)
        if not all(bool(t.isfinite().all()) for t in tensors):
            return f"the folded weights overflow {tensors[0].dtype}"
        if self.mode == "tune":
            (weight, bias), created = inline_function(program.graph, fold_present, present, values, root)
            return weight, bias, created
        created = []
        with program.graph.inserting_before(root):
            for tensor, hint in zip(tensors, ("weight", "bias")):
                created.append(program.graph.get_attr(add_constant(program, tensor.contiguous(), f"folded_{hint}")))
        return created[0], created[1], created


# ---------------------------------------------------------------------- recognizing the pieces


def _is_call(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _layer(node: object) -> _Layer | None:
    """The conv or linear computed by ``node``, when its weight (and bias) are constants."""
    if not _is_call(node, aten.convolution.default, aten.linear.default):
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not _is_constant(weight) or not (bias is None or _is_constant(bias)):
        return None
    return _Layer(node, weight, bias)


def _layer_kind(layer: _Layer) -> str:
    return "linear" if layer.is_linear else ("conv-transpose" if layer.transposed else "conv")


def _is_constant(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _next_to_a_layer(node: fx.Node) -> bool:
    return _layer(node.args[0]) is not None or any(_layer(u) is not None for u in node.users)


def _affine(program: Program, node: fx.Node) -> _Affine | None:
    """The per-channel affine ``node`` computes, if it is one."""
    if _is_call(node, operator.getitem) and _is_call(node.args[0], _BATCH_NORM) and node.args[1] == 0:
        return _batch_norm(node)
    if not _is_call(node, *_MUL, *_DIV, *_ADD, *_SUB) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    if node.target in _MUL + _ADD and not _is_activation(a):
        a, b = b, a  # c * x, c + x
    if not _is_activation(a):
        return None
    constant = _constant_vector(program, node, a, b)
    if constant is None:
        return None
    value, dim, param = constant
    multiplies, inverts = node.target in _MUL + _DIV, node.target in _DIV + _SUB
    if node.target in _DIV and (value == 0).any():
        return None  # x / 0 is inf or nan; a folded weight * inf is not the same

    def coefficients(zeros, *params):
        c = zeros + (params[0].float().reshape(-1) if param is not None else float(value))
        if inverts:
            c = 1 / c if multiplies else -c
        return (c, zeros) if multiplies else (zeros + 1, c)

    kind = {**dict.fromkeys(_MUL, "mul"), **dict.fromkeys(_DIV, "div"),
            **dict.fromkeys(_ADD, "add"), **dict.fromkeys(_SUB, "sub")}[node.target]
    return _Affine(kind, a, node, [node], [param] if param is not None else [], coefficients, dim)


def _is_activation(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr"


def _constant_vector(program: Program, node: fx.Node, x: fx.Node, c: object):
    """``(value, channel dim, get_attr node)`` when ``c`` is a scalar or a per-channel constant for ``x``.

    The channel dim is ``None`` when ``c`` is the same for every channel.
    """
    out, val = node.meta.get("val"), x.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(val, torch.Tensor) or out.shape != val.shape:
        return None
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return torch.tensor(float(c)), None, None
    if not _is_constant(c):
        return None
    tensor = program.get_constant(c.target)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() > val.dim():
        return None
    shape = (1,) * (val.dim() - tensor.dim()) + tuple(tensor.shape)
    varying = [d for d, size in enumerate(shape) if size != 1]
    if len(varying) > 1:
        return None
    return tensor, (varying[0] if varying else None), c


def _batch_norm(node: fx.Node) -> _Affine | None:
    bn = node.args[0]
    x, gamma, beta, mean, var, _momentum, eps = bn.args
    if len(bn.users) != 1 or not all(p is None or _is_constant(p) for p in (gamma, beta)):
        return None
    if not (_is_constant(mean) and _is_constant(var)):
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
    return _Affine("batch-norm", x, node, [node, bn], params, coefficients, 1)


def _dtype_problem(affine: _Affine, layer: _Layer) -> str | None:
    """Why folding would change a dtype (an fp32 constant promoting an fp16 activation), if it would."""
    out, x = affine.out.meta["val"].dtype, affine.x.meta["val"].dtype
    if out != x or x != layer.node.meta["val"].dtype:
        return f"dtype mismatch ({x} in, {out} out)"
    return None


def _note_once(ctx: PassContext, node: fx.Node, reason: str) -> None:
    where = describe_node(node)
    if not any(note.startswith(f"skipped {where}:") for note in ctx.notes):
        ctx.skip(where, reason)

