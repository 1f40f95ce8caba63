"""The channel rules of each op: which dimensions of its inputs and outputs an op ties together, or pins.

They are methods of :class:`OpRules`, mixed into :class:`~fxopt.prune.dependency.ChannelGraph`, which calls the
rule :data:`RULES` gives for each node's op (pointwise ops share one rule). A new op gets a method here and an
entry in :data:`RULES`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from fxopt.ir.meta import describe_node, shape_of
from fxopt.ir.traits import ALONG_DIM, BATCH_NORM, COPIES, POOLS, REDUCTIONS, SDPA, VIEWS
from fxopt.prune.groups import Cat, Prod, Tree

if TYPE_CHECKING:
    from fxopt.prune.dependency import ChannelGraph

__all__ = ["OpRules", "RULES", "WEIGHT_ARGS", "layer_weight", "slice_args", "tensor_values"]

aten = torch.ops.aten

# Ops whose output has their first input's shape and treats each channel alike.
_SHAPE_ONLY = (*COPIES, aten.hardswish.default, aten.hardsigmoid.default, aten.detach.default)

# Where the weight (and bias) of a layer are among its arguments.
WEIGHT_ARGS = {aten.linear.default: (1, 2), aten.convolution.default: (1, 2), aten.addmm.default: (2, 0)}


def layer_weight(layer: fx.Node) -> fx.Node | None:
    """The ``get_attr`` of a linear, conv or addmm's weight, if it reads one directly."""
    arg = layer.args[WEIGHT_ARGS[layer.target][0]] if layer.target in WEIGHT_ARGS else None
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


class OpRules:
    """The per-op rules of :class:`~fxopt.prune.dependency.ChannelGraph` (a mixin: ``self`` is the graph)."""

    def _broadcast_into(self: ChannelGraph, out: list[Tree], out_shape: list, arg: object) -> None:
        shape, trees = shape_of(arg), self.value_dims(arg)
        offset = len(out_shape) - len(shape)
        for d, size in enumerate(shape):
            if d + offset >= 0 and size == out_shape[d + offset]:
                self.unify(trees[d], out[d + offset])

    def _pointwise(self: ChannelGraph, node: fx.Node) -> None:
        out_shape = shape_of(node)
        out = self._new(node)
        for arg in node.args:
            self._broadcast_into(out, out_shape, arg)
        self.dims[node] = out

    def _same(self: ChannelGraph, node: fx.Node) -> None:
        self.dims[node] = list(self.value_dims(node.args[0])) or self._new(node)

    def _along_dim(self: ChannelGraph, node: fx.Node) -> None:
        """softmax / log-softmax / cumsum: every output channel of the dim depends on the others (a removed
        channel, even an all-zero one, changes the softmax's denominator or the later running sums)."""
        trees = list(self.value_dims(node.args[0]))
        self.pin(trees[node.args[1] % len(trees)], f"{_op_name(node)} runs over these channels ({describe_node(node)})")
        self.dims[node] = trees

    def _reduction(self: ChannelGraph, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(shape_of(x))
        reduced = node.args[1] if len(node.args) > 1 else None
        reduced = [reduced] if isinstance(reduced, int) else list(reduced or range(rank))  # [] and None: all dims
        reduced = {d % rank for d in reduced} if rank else set()
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        trees = self.value_dims(x)
        for d in reduced:  # a reduction over fewer channels is another value, broadcast back to the rest
            self.pin(trees[d], f"{_op_name(node)} runs over these channels ({describe_node(node)})")
        dims = []
        for d, t in enumerate(trees):
            if d not in reduced:
                dims.append(t)
            elif keep:
                dims.append(self.fresh(1))
        self.dims[node] = dims if len(dims) == len(shape_of(node)) else self._new(node)

    def _view(self: ChannelGraph, node: fx.Node) -> None:
        self.dims[node] = self.reshape(self.value_dims(node.args[0]), shape_of(node.args[0]), shape_of(node))

    def reshape(self: ChannelGraph, trees: list[Tree], shape: list[int], out_shape: list[int]) -> list[Tree]:
        """Trees of a reshape's output: runs of dims with equal element counts are merged or split."""
        out: list[Tree] = [self.fresh(s) for s in out_shape]
        i = j = 0
        while i < len(shape) or j < len(out_shape):
            if j < len(out_shape) and out_shape[j] == 1:
                j += 1
                continue
            if i < len(shape) and shape[i] == 1:
                i += 1
                continue
            if i >= len(shape) or j >= len(out_shape):
                break
            gi, gj = [i], [j]
            while math.prod(shape[k] for k in gi) != math.prod(out_shape[k] for k in gj):
                if math.prod(shape[k] for k in gi) < math.prod(out_shape[k] for k in gj):
                    i += 1
                    gi.append(i)
                else:
                    j += 1
                    gj.append(j)
            self.unify(Prod(tuple(trees[k] for k in gi)), Prod(tuple(out[k] for k in gj)))
            i, j = i + 1, j + 1
        return out

    def _permute(self: ChannelGraph, node: fx.Node) -> None:
        trees = self.value_dims(node.args[0])
        self.dims[node] = [trees[d % len(trees)] for d in node.args[1]]

    def _transpose(self: ChannelGraph, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        if len(trees) >= 2:
            a, b = (node.args[1] % len(trees), node.args[2] % len(trees)) if len(node.args) > 1 else (0, 1)
            trees[a], trees[b] = trees[b], trees[a]
        self.dims[node] = trees

    def _unsqueeze(self: ChannelGraph, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        trees.insert(node.args[1] % (len(trees) + 1), self.fresh(1))
        self.dims[node] = trees

    def _squeeze(self: ChannelGraph, node: fx.Node) -> None:
        trees, shape = self.value_dims(node.args[0]), shape_of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
        dims = {d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)}
        self.dims[node] = [t for d, t in enumerate(trees) if not (d in dims and shape[d] == 1)]

    def _expand(self: ChannelGraph, node: fx.Node) -> None:
        out_shape, shape, trees = shape_of(node), shape_of(node.args[0]), self.value_dims(node.args[0])
        offset = len(out_shape) - len(shape)
        self.dims[node] = [
            trees[d - offset] if d >= offset and shape[d - offset] == size else self.fresh(size)
            for d, size in enumerate(out_shape)
        ]

    def _cat(self: ChannelGraph, node: fx.Node) -> None:
        tensors = [t for t in node.args[0] if shape_of(t)]
        rank = len(shape_of(node))
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        out = self._new(node)
        for t in tensors:
            for d, tree in enumerate(self.value_dims(t)):
                if d != dim:
                    self.unify(tree, out[d])
        out[dim] = Cat(tuple(self.value_dims(t)[dim] for t in tensors))
        self.dims[node] = out

    def _split(self: ChannelGraph, node: fx.Node) -> None:
        x = node.args[0]
        trees, shape = self.value_dims(x), shape_of(x)
        dim = (node.args[2] if len(node.args) > 2 else 0) % len(shape)
        pieces = [self.fresh(_value_shape(v)[dim]) for v in node.meta["val"]]
        self.unify(trees[dim], Cat(tuple(pieces)))
        self.dims[node] = tuple([*trees[:dim], piece, *trees[dim + 1 :]] for piece in pieces)

    def _slice(self: ChannelGraph, node: fx.Node) -> None:
        x = node.args[0]
        trees, shape = list(self.value_dims(x)), shape_of(x)
        dim, start, end, step = slice_args(node)
        out = list(trees)
        if (start, end, step) != (0, shape[dim], 1):
            if step != 1:
                self.pin(trees[dim], f"strided slice ({describe_node(node)})")
                out[dim] = self.fresh(shape_of(node)[dim])
            else:
                middle = self.fresh(end - start)
                parts = [p for p in (self.fresh(start), middle, self.fresh(shape[dim] - end)) if p.size]
                self.unify(trees[dim], Cat(tuple(parts)))
                out[dim] = middle
        self.dims[node] = out

    def _select(self: ChannelGraph, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        dim = node.args[1] % len(trees)
        self.pin(trees[dim], f"an index is selected ({describe_node(node)})")
        self.dims[node] = trees[:dim] + trees[dim + 1 :]

    def _embedding(self: ChannelGraph, node: fx.Node) -> None:
        weight, indices = node.args[:2]
        w = self.value_dims(weight)
        self.pin(w[0], "embedding rows are looked up by index")
        self.dims[node] = list(self.value_dims(indices)) + [w[1]]
        self._member(w[1], node, 1, "out")

    def _linear(self: ChannelGraph, node: fx.Node) -> None:
        x, w = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else None
        xs, ws = self.value_dims(x), self.value_dims(w)
        self.unify(xs[-1], ws[1])
        if bias is not None:
            self.unify(self.value_dims(bias)[0], ws[0])
        self.dims[node] = list(xs[:-1]) + [ws[0]]
        self._member(ws[0], node, 0, "out")
        self._member(ws[1], node, 1, "in")

    def _addmm(self: ChannelGraph, node: fx.Node) -> None:
        bias, a, b = node.args[:3]
        at, bt = self.value_dims(a), self.value_dims(b)
        self.unify(at[1], bt[0])
        out = [at[0], bt[1]]
        self._broadcast_into(out, shape_of(node), bias)
        self.dims[node] = out
        self._member(bt[1], node, 1, "out")
        self._member(bt[0], node, 0, "in")

    def _mm(self: ChannelGraph, node: fx.Node) -> None:
        a, b = node.args[:2]
        at, bt = self.value_dims(a), self.value_dims(b)
        for x, y in zip(at[:-2], bt[:-2]):
            self.unify(x, y)
        self.unify(at[-1], bt[-2])
        self.dims[node] = list(at[:-1]) + [bt[-1]]

    def _convolution(self: ChannelGraph, node: fx.Node) -> None:
        x, w, bias = node.args[:3]
        transposed, groups = bool(node.args[6]), int(node.args[8])
        xs, ws = self.value_dims(x), self.value_dims(w)
        for t in ws[2:]:
            self.pin(t, "convolution kernel")
        for t in xs[2:]:  # the output's spatial size follows the input's (a linear's features can be a width)
            self.pin(t, "spatial dimension")
        weight_in, weight_out = (ws[0], ws[1]) if transposed else (ws[1], ws[0])
        in_shape, out_shape = shape_of(x), shape_of(node)
        if groups > 1:
            group = self.fresh(groups)
            per_in, per_out = weight_in, self.fresh(out_shape[1] // groups)
            if transposed:
                per_in, per_out = self.fresh(in_shape[1] // groups), weight_out
                self.unify(weight_in, Prod((group, per_in)))
            else:
                self.unify(weight_out, Prod((group, per_out)))
            self.unify(xs[1], Prod((group, per_in)))
            out_channels: Tree = Prod((group, per_out))
            self.group_counts[node] = group
        else:
            self.unify(xs[1], weight_in)
            out_channels = weight_out
        if bias is not None:
            self.unify(self.value_dims(bias)[0], out_channels)
        out = [xs[0], out_channels] + [self.fresh(s) for s in out_shape[2:]]
        for t in out[2:]:
            self.pin(t, "spatial dimension")
        self.dims[node] = out
        self._member(ws[1 if transposed else 0], node, 0, "out")
        self._member(ws[0 if transposed else 1], node, 1, "in")

    def _spatial(self: ChannelGraph, node: fx.Node) -> None:
        """Pools and resizes: batch and channels pass through, spatial dims are new."""
        xs = self.value_dims(node.args[0])
        for t in xs[2:]:
            self.pin(t, "spatial dimension")
        value = node.meta["val"]
        values = value if isinstance(value, (tuple, list)) else [value]
        results = []
        for v in values:
            dims = list(xs[:2]) + [self.fresh(s) for s in v.shape[2:]]
            for t in dims[2:]:
                self.pin(t, "spatial dimension")
            results.append(dims)
        self.dims[node] = tuple(results) if isinstance(value, (tuple, list)) else results[0]

    def _pad(self: ChannelGraph, node: fx.Node) -> None:
        x, pad = node.args[:2]
        trees = list(self.value_dims(x))
        for k in range(len(pad) // 2):
            d = len(trees) - 1 - k
            if pad[2 * k] or pad[2 * k + 1]:
                self.pin(trees[d], "padded dimension")
                trees[d] = self.fresh(shape_of(node)[d])
                self.pin(trees[d], "padded dimension")
        self.dims[node] = trees

    def _norm(self: ChannelGraph, node: fx.Node) -> None:
        """layer_norm(x, shape, w, b) / rms_norm(x, shape, w): the affine indexes the normalized dims."""
        x, normalized = node.args[:2]
        params = node.args[2:4] if node.target is aten.layer_norm.default else node.args[2:3]
        xs = self.value_dims(x)
        self.normalized.extend(xs[len(xs) - len(normalized) :])
        if isinstance(node.args[2], fx.Node):
            self.norm_weights.add(node.args[2].target)
        for p in params:
            if isinstance(p, fx.Node):
                for a, b in zip(self.value_dims(p), xs[len(xs) - len(normalized) :]):
                    self.unify(a, b)
                self._member(self.value_dims(p)[-1], node, 0, "param")
        self.dims[node] = list(xs)

    def _group_norm(self: ChannelGraph, node: fx.Node) -> None:
        x, groups, weight, bias = node.args[:4]
        xs = self.value_dims(x)
        channels = shape_of(x)[1]
        group = self.fresh(groups)
        self.unify(xs[1], Prod((group, self.fresh(channels // groups))))
        self.group_counts[node] = group
        if isinstance(weight, fx.Node):
            self.norm_weights.add(weight.target)
        for p in (weight, bias):
            if isinstance(p, fx.Node):
                self.unify(self.value_dims(p)[0], xs[1])
                self._member(xs[1], node, 0, "param")
        self.dims[node] = list(xs)

    def _batch_norm(self: ChannelGraph, node: fx.Node) -> None:
        x = node.args[0]
        xs = self.value_dims(x)
        if isinstance(node.args[1], fx.Node):
            self.norm_weights.add(node.args[1].target)
        for p in node.args[1:5]:
            if isinstance(p, fx.Node):
                self.unify(self.value_dims(p)[0], xs[1])
        self._member(xs[1], node, 0, "param")
        extra = [[self.fresh(s) for s in v.shape] for v in node.meta["val"][1:]]
        self.dims[node] = (list(xs), *extra)

    def _sdpa(self: ChannelGraph, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        if node.kwargs.get("enable_gqa"):
            self._opaque(node, "grouped-query SDPA (enable_gqa)")
            return
        qs, ks, vs = self.value_dims(q), self.value_dims(k), self.value_dims(v)
        for a, b, c in zip(qs[:-2], ks[:-2], vs[:-2]):
            self.unify(a, b)
            self.unify(a, c)
        self.unify(qs[-1], ks[-1])
        if qs[-1].size == vs[-1].size:
            # One head_dim for Q, K and V: SDPA kernels (and the layout of their output, which the
            # view after it relies on) differ when the value's head_dim differs from the query's.
            self.unify(qs[-1], vs[-1])
        self.unify(ks[-2], vs[-2])
        out = list(qs[:-1]) + [vs[-1]]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            scores = list(qs[:-1]) + [ks[-2]]
            self._broadcast_into(scores, shape_of(q)[:-1] + [shape_of(k)[-2]], mask)
        if len(qs) >= 3:
            self._roles.append((qs[-3], "heads"))
        self._roles.append((qs[-1], "head-dim"))
        self._roles.append((vs[-1], "head-dim"))
        self.dims[node] = out


def _op_name(node: fx.Node) -> str:
    return node.target._opname.lstrip("_") if isinstance(node.target, torch._ops.OpOverload) else str(node.target)


def _value_shape(value: object) -> list:
    return list(value.shape) if isinstance(value, torch.Tensor) else []


def tensor_values(node: fx.Node) -> Iterator[torch.Tensor]:
    for value in [node.meta.get("val"), *(n.meta.get("val") for n in node.all_input_nodes)]:
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(v, torch.Tensor):
                yield v


def slice_args(node: fx.Node) -> tuple[int, int, int, int]:
    """``slice(x, dim, start, end, step)`` with defaults filled and bounds clamped to the input."""
    shape = shape_of(node.args[0])
    args = list(node.args[1:]) + [None] * (5 - len(node.args))
    dim = (args[0] or 0) % len(shape)
    size = shape[dim]
    start = 0 if args[1] is None else args[1]
    end = size if args[2] is None else args[2]
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    return dim, start, end, args[3] or 1


RULES: dict[object, object] = {
    **dict.fromkeys(_SHAPE_ONLY, OpRules._same),
    **dict.fromkeys(ALONG_DIM, OpRules._along_dim),
    **dict.fromkeys(REDUCTIONS, OpRules._reduction),
    **dict.fromkeys(VIEWS, OpRules._view),
    **dict.fromkeys(POOLS, OpRules._spatial),
    aten.permute.default: OpRules._permute,
    aten.transpose.int: OpRules._transpose,
    aten.t.default: OpRules._transpose,
    aten.unsqueeze.default: OpRules._unsqueeze,
    aten.squeeze.dim: OpRules._squeeze,
    aten.squeeze.dims: OpRules._squeeze,
    aten.expand.default: OpRules._expand,
    aten.cat.default: OpRules._cat,
    aten.split_with_sizes.default: OpRules._split,
    aten.split.Tensor: OpRules._split,
    aten.slice.Tensor: OpRules._slice,
    aten.select.int: OpRules._select,
    aten.embedding.default: OpRules._embedding,
    aten.linear.default: OpRules._linear,
    aten.addmm.default: OpRules._addmm,
    aten.mm.default: OpRules._mm,
    aten.bmm.default: OpRules._mm,
    aten.convolution.default: OpRules._convolution,
    aten.constant_pad_nd.default: OpRules._pad,
    aten.layer_norm.default: OpRules._norm,
    aten.rms_norm.default: OpRules._norm,
    aten.group_norm.default: OpRules._group_norm,
    BATCH_NORM: OpRules._batch_norm,
    SDPA: OpRules._sdpa,
}
