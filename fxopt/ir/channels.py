"""Channel dependencies: which tensor dimensions must shrink together when channels are removed.

Every dimension of every value in the graph is described by an *index tree*
over abstract channel axes (:class:`Space`): a leaf is one axis, ``Cat`` lays
trees end to end (``cat``, ``split``, ``slice``), ``Prod`` combines them
row-major (a view merging ``C x H x W`` into features, or splitting features
into ``heads x head_dim``). Ops unify the trees of the dimensions they tie
together: a linear's input features with its weight's columns, both operands
of a residual add, a grouped conv's channels with its group count. After one
walk over the graph, each remaining axis is a *group*: removing index ``j``
of it removes, from every tensor whose trees contain it, exactly the
positions that map to ``j``, and the graph stays valid.

Axes are *pinned* (never pruned) when they reach a model input or output, a
convolution's spatial or kernel dims, an index an op selects or gathers by,
a dim a softmax, cumsum or reduction (sum, mean, variance, extremum) runs over (each output
depends on every channel there), or an op without a rule here (named in the
reason). That is the one fallback: an unknown op costs coverage, never a
wrong shape. A rule that fails on its op's arguments is a bug and raises.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, drop_unread_constants
from fxopt.ir.layers import BATCH_NORM, is_call
from fxopt.ir.meta import describe_node, module_name, propagate_meta, shape_of
from fxopt.ir.program import Program
from fxopt.ir.traits import ALONG_DIM, REDUCTIONS, SDPA, VIEWS

__all__ = ["Space", "Leaf", "Cat", "Prod", "Tree", "ChannelGraph", "Group", "Member", "analyze"]

aten = torch.ops.aten


class Space:
    """One axis of channels. Union-find: coupled axes share a root; a root may be *defined* as a tree of finer axes."""

    __slots__ = ("size", "parent", "alias", "id")

    def __init__(self, size: int, id: int):
        self.size, self.id = size, id
        self.parent: Space = self
        self.alias: Tree | None = None

    def root(self) -> Space:
        while self.parent is not self:
            self.parent.parent, self = self.parent.parent.parent, self.parent.parent
        return self

    def __repr__(self) -> str:
        return f"S{self.id}[{self.size}]"


@dataclass(frozen=True)
class Leaf:
    space: Space

    @property
    def size(self) -> int:
        return self.space.size


@dataclass(frozen=True)
class Cat:
    parts: tuple[Tree, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class Prod:
    factors: tuple[Tree, ...]

    @property
    def size(self) -> int:
        return math.prod(f.size for f in self.factors)


Tree = Leaf | Cat | Prod


@dataclass(frozen=True)
class Member:
    """A layer or norm a group passes through: ``dim`` of its weight (or affine) indexes the group's channels."""

    node: fx.Node
    dim: int
    role: str  # "out" (a layer's output channels), "in" (its input channels), "param" (a norm's affine)

    @property
    def label(self) -> str:
        """``conv 'layer1.0.conv1'``: the op and the module that created it."""
        return _short(self.node)


@dataclass
class Group:
    """Channels that are pruned together: one root axis and every constant dim it indexes."""

    space: Space
    constants: list[tuple[str, int]] = field(default_factory=list)  # (constant target, dim)
    members: list[Member] = field(default_factory=list)
    roles: set[str] = field(default_factory=set)  # "heads", "head-dim"

    @property
    def size(self) -> int:
        return self.space.size

    def describe(self) -> str:
        """``out: conv 'layer1.conv' | in: linear 'fc' | param: bn ...``-style summary of the members."""
        return ", ".join(dict.fromkeys(f"{m.role} {m.label}" for m in self.members))


def _short(node: fx.Node) -> str:
    op = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    return f"{_OP_NAMES.get(op, op)} '{module_name(node) or node.name}'"


_OP_NAMES = {"convolution": "conv", "_native_batch_norm_legit_no_training": "batch_norm",
             "scaled_dot_product_attention": "attention"}


# Ops whose output has their first input's shape and treats each channel alike.
_SHAPE_ONLY = (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.hardswish.default,
               aten.hardsigmoid.default, aten.detach.default)
# Ops whose output has their input's shape but mixes the channels of one dim (their second argument).
_POOLS = (aten.max_pool2d_with_indices.default, aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default,
          aten.avg_pool1d.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)


class ChannelGraph:
    """The index trees of every dimension of every value of one program; see the module docstring."""

    def __init__(self, program: Program):
        self.program = program
        self.dims: dict[fx.Node, object] = {}  # node -> list[Tree] (or a tuple of lists for multi-output ops)
        self._constants: dict[str, list[Tree]] = {}  # by target: tied get_attrs share their axes
        self._pins: list[tuple[Tree, str]] = []
        self._roles: list[tuple[Tree, str]] = []
        self._members: list[tuple[Tree, Member]] = []
        self._next = 0
        self.group_counts: dict[fx.Node, Tree] = {}  # grouped conv / group_norm -> its axis of groups
        self.norm_weights: set[str] = set()  # constants that scale a normalization's output
        for node in program.graph.nodes:
            self._visit(node)

    # ------------------------------------------------------------------ trees

    def fresh(self, size: int) -> Leaf:
        self._next += 1
        return Leaf(Space(int(size), self._next))

    def resolve(self, tree: Tree) -> Tree:
        """The tree in terms of current root axes: aliases expanded, nested products and concatenations flattened."""
        if isinstance(tree, Leaf):
            root = tree.space.root()
            return self.resolve(root.alias) if root.alias is not None else Leaf(root)
        kind = type(tree)
        children = [self.resolve(c) for c in (tree.parts if kind is Cat else tree.factors)]
        flat: list[Tree] = []
        for c in children:
            if type(c) is kind:
                flat.extend(c.parts if kind is Cat else c.factors)
            elif not (kind is Prod and c.size == 1) and c.size:
                flat.append(c)
        if len(flat) == 1:
            return flat[0]
        if not flat:
            return children[0] if children else self.fresh(1 if kind is Prod else 0)
        return Cat(tuple(flat)) if kind is Cat else Prod(tuple(flat))

    def leaves(self, tree: Tree) -> Iterator[Space]:
        tree = self.resolve(tree)
        if isinstance(tree, Leaf):
            yield tree.space
        else:
            for child in tree.parts if isinstance(tree, Cat) else tree.factors:
                yield from self.leaves(child)

    def unify(self, a: Tree, b: Tree, why: str = "") -> None:
        """Make two trees index the same positions; what cannot be matched up is pinned."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        if a.size != b.size:
            self.pin(a, why or "sizes do not match")
            self.pin(b, why or "sizes do not match")
            return
        if isinstance(a, Leaf) and isinstance(b, Leaf):
            b.space.parent = a.space
            return
        if isinstance(b, Leaf):
            a, b = b, a
        if isinstance(a, Leaf):
            if a.space in set(self.leaves(b)):
                self.pin(b, why or "an axis is tied to part of itself")
                return
            a.space.alias = b
            return
        if type(a) is type(b):
            self._unify_lists(a, b, why)
            return
        self.pin(a, why or "concatenated and reshaped the same dimension")
        self.pin(b, why or "concatenated and reshaped the same dimension")

    def _unify_lists(self, a: Cat | Prod, b: Cat | Prod, why: str) -> None:
        """Pair up runs of children with equal total size; a run of several against several is pinned."""
        is_cat = isinstance(a, Cat)
        xs = list(a.parts if is_cat else a.factors)
        ys = list(b.parts if is_cat else b.factors)
        combine = sum if is_cat else math.prod
        make = Cat if is_cat else Prod
        i = j = 0
        while i < len(xs) and j < len(ys):
            gx, gy = [xs[i]], [ys[j]]
            while combine(t.size for t in gx) != combine(t.size for t in gy):
                if combine(t.size for t in gx) < combine(t.size for t in gy) and i + 1 < len(xs):
                    i += 1
                    gx.append(xs[i])
                elif j + 1 < len(ys):
                    j += 1
                    gy.append(ys[j])
                else:
                    break
            left = gx[0] if len(gx) == 1 else make(tuple(gx))
            right = gy[0] if len(gy) == 1 else make(tuple(gy))
            if len(gx) == 1 or len(gy) == 1:
                self.unify(left, right, why)
            else:
                self.pin(left, why or "reshaped differently")
                self.pin(right, why or "reshaped differently")
            i, j = i + 1, j + 1

    def pin(self, tree: Tree, why: str) -> None:
        self._pins.append((tree, why))

    # ------------------------------------------------------------------ results

    def pinned(self) -> dict[Space, str]:
        """Root axes that must keep every channel, with the first reason found."""
        reasons: dict[Space, str] = {}
        for tree, why in self._pins:
            for space in self.leaves(tree):
                reasons.setdefault(space, why)
        return reasons

    def constant_dims(self) -> dict[str, list[Tree]]:
        return self._constants

    def groups(self) -> tuple[list[Group], list[tuple[Group, str]]]:
        """Prunable groups, and the groups that would be but are pinned (with the reason).

        A group is a root axis of two or more channels that indexes a floating
        weight (a constant of rank 2 or more): removing its channels removes work.
        """
        pinned = self.pinned()
        found: dict[Space, Group] = {}
        seen: set[int] = set()
        for target, trees in self._constants.items():
            value = self.program.get_constant(target)
            if not value.is_floating_point() or id(trees) in seen:
                continue
            seen.add(id(trees))
            for d, tree in enumerate(trees):
                for space in dict.fromkeys(self.leaves(tree)):
                    if space.size > 1:
                        found.setdefault(space, Group(space)).constants.append((target, d))
        for tree, member in self._members:
            for space in dict.fromkeys(self.leaves(tree)):
                if space in found:
                    found[space].members.append(member)
        for tree, role in self._roles:
            for space in dict.fromkeys(self.leaves(tree)):
                if space in found:
                    found[space].roles.add(role)
        weighted = [g for g in found.values() if any(self.program.get_constant(t).dim() >= 2 for t, _ in g.constants)]
        return ([g for g in weighted if g.space not in pinned],
                [(g, pinned[g.space]) for g in weighted if g.space in pinned])

    def kept(self, tree: Tree, keep: dict[Space, torch.Tensor]) -> torch.Tensor:
        """Positions of a dim (a sorted index tensor) that survive when each axis in ``keep`` keeps those indices."""
        tree = self.resolve(tree)
        if isinstance(tree, Leaf):
            return keep[tree.space] if tree.space in keep else torch.arange(tree.size)
        if isinstance(tree, Cat):
            parts, offset = [], 0
            for part in tree.parts:
                parts.append(self.kept(part, keep) + offset)
                offset += part.size
            return torch.cat(parts)
        result = torch.zeros(1, dtype=torch.long)
        for factor in tree.factors:
            result = (result[:, None] * factor.size + self.kept(factor, keep)[None, :]).reshape(-1)
        return result

    def kept_size(self, tree: Tree, counts: dict[Space, int]) -> int:
        """How many positions of a dim survive when each axis in ``counts`` keeps that many channels."""
        tree = self.resolve(tree)
        if isinstance(tree, Leaf):
            return counts.get(tree.space, tree.size)
        if isinstance(tree, Cat):
            return sum(self.kept_size(p, counts) for p in tree.parts)
        return math.prod(self.kept_size(f, counts) for f in tree.factors)

    def coordinates(self, tree: Tree, space: Space) -> torch.Tensor:
        """For each position of a dim, its index along axis ``space`` (-1 where the axis is not involved)."""
        tree = self.resolve(tree)
        if isinstance(tree, Leaf):
            return torch.arange(tree.size) if tree.space is space else torch.full((tree.size,), -1)
        if isinstance(tree, Cat):
            return torch.cat([self.coordinates(p, space) for p in tree.parts])
        result = torch.full((1,), -1)
        for factor in tree.factors:
            inner = self.coordinates(factor, space)
            result = torch.maximum(result[:, None], inner[None, :]).reshape(-1)
        return result

    # ------------------------------------------------------------------ per-op rules

    def value_dims(self, value: object) -> list[Tree]:
        """The trees of the dims of the tensor ``value`` (a node) computes; ``[]`` for anything else."""
        if isinstance(value, fx.Node):
            dims = self.dims.get(value)
            if isinstance(dims, list):
                return dims
        return []

    def _new(self, node: fx.Node) -> list[Tree]:
        return [self.fresh(s) for s in shape_of(node)]

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.dims[node] = self._new(node)
            for t in self.dims[node]:
                self.pin(t, "model input")
            return
        if node.op == "get_attr":
            value = self.program.get_constant(node.target)
            if isinstance(value, torch.Tensor):
                if node.target not in self._constants:
                    # Tied weights (one tensor under two names) are one set of axes.
                    tied = next((t for t in self._constants if self.program.get_constant(t) is value), None)
                    self._constants[node.target] = (self._constants[tied] if tied else
                                                    [self.fresh(s) for s in value.shape])
                self.dims[node] = self._constants[node.target]
            return
        if node.op == "output":
            for value in node.args[0]:
                for t in self.value_dims(value):
                    self.pin(t, "model output")
            return
        if node.op != "call_function":
            self._opaque(node, f"{node.op} node")
            return
        if not all(isinstance(s, int) for v in _tensor_values(node) for s in v.shape):
            self._opaque(node, "dynamic shape")
            return
        if is_call(node, operator.getitem):
            source = self.dims.get(node.args[0])
            self.dims[node] = source[node.args[1]] if isinstance(source, tuple) else self._new(node)
            if not isinstance(source, tuple):
                self.pin_all(node, "getitem of an op without a rule")
            return
        rule = _RULES.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
            rule = ChannelGraph._pointwise
        if rule is None:
            self._opaque(node, f"no pruning rule for {node.target}")
            return
        rule(self, node)

    def pin_all(self, node: fx.Node, why: str) -> None:
        for t in self.value_dims(node):
            self.pin(t, why)

    def _opaque(self, node: fx.Node, why: str) -> None:
        """An op without a rule: pin every dim it reads or writes."""
        for arg in node.all_input_nodes:
            for t in self.value_dims(arg):
                self.pin(t, f"{why} ({describe_node(node)})")
        value = node.meta.get("val")
        if isinstance(value, (tuple, list)):
            self.dims[node] = tuple([self.fresh(s) for s in v.shape] if isinstance(v, torch.Tensor) else []
                                    for v in value)
            for dims in self.dims[node]:
                for t in dims:
                    self.pin(t, why)
        else:
            self.dims[node] = self._new(node)
            self.pin_all(node, why)

    def _member(self, tree: Tree, node: fx.Node, dim: int, role: str) -> None:
        self._members.append((tree, Member(node, dim, role)))

    def _broadcast_into(self, out: list[Tree], out_shape: list, arg: object) -> None:
        shape, trees = shape_of(arg), self.value_dims(arg)
        offset = len(out_shape) - len(shape)
        for d, size in enumerate(shape):
            if d + offset >= 0 and size == out_shape[d + offset]:
                self.unify(trees[d], out[d + offset])

    def _pointwise(self, node: fx.Node) -> None:
        out_shape = shape_of(node)
        out = self._new(node)
        for arg in node.args:
            self._broadcast_into(out, out_shape, arg)
        self.dims[node] = out

    def _same(self, node: fx.Node) -> None:
        self.dims[node] = list(self.value_dims(node.args[0])) or self._new(node)

    def _along_dim(self, node: fx.Node) -> None:
        """softmax / log-softmax / cumsum: every output channel of the dim depends on the others (a removed
        channel, even an all-zero one, changes the softmax's denominator or the later running sums)."""
        trees = list(self.value_dims(node.args[0]))
        self.pin(trees[node.args[1] % len(trees)], f"{_op_name(node)} runs over these channels ({describe_node(node)})")
        self.dims[node] = trees

    def _reduction(self, node: fx.Node) -> None:
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

    def _view(self, node: fx.Node) -> None:
        self.dims[node] = self.reshape(self.value_dims(node.args[0]), shape_of(node.args[0]), shape_of(node))

    def reshape(self, trees: list[Tree], shape: list[int], out_shape: list[int]) -> list[Tree]:
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

    def _permute(self, node: fx.Node) -> None:
        trees = self.value_dims(node.args[0])
        self.dims[node] = [trees[d % len(trees)] for d in node.args[1]]

    def _transpose(self, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        if len(trees) >= 2:
            a, b = (node.args[1] % len(trees), node.args[2] % len(trees)) if len(node.args) > 1 else (0, 1)
            trees[a], trees[b] = trees[b], trees[a]
        self.dims[node] = trees

    def _unsqueeze(self, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        trees.insert(node.args[1] % (len(trees) + 1), self.fresh(1))
        self.dims[node] = trees

    def _squeeze(self, node: fx.Node) -> None:
        trees, shape = self.value_dims(node.args[0]), shape_of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
        dims = {d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)}
        self.dims[node] = [t for d, t in enumerate(trees) if not (d in dims and shape[d] == 1)]

    def _expand(self, node: fx.Node) -> None:
        out_shape, shape, trees = shape_of(node), shape_of(node.args[0]), self.value_dims(node.args[0])
        offset = len(out_shape) - len(shape)
        self.dims[node] = [
            trees[d - offset] if d >= offset and shape[d - offset] == size else self.fresh(size)
            for d, size in enumerate(out_shape)
        ]

    def _cat(self, node: fx.Node) -> None:
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

    def _split(self, node: fx.Node) -> None:
        x = node.args[0]
        trees, shape = self.value_dims(x), shape_of(x)
        dim = (node.args[2] if len(node.args) > 2 else 0) % len(shape)
        pieces = [self.fresh(_value_shape(v)[dim]) for v in node.meta["val"]]
        self.unify(trees[dim], Cat(tuple(pieces)))
        self.dims[node] = tuple([*trees[:dim], piece, *trees[dim + 1:]] for piece in pieces)

    def _slice(self, node: fx.Node) -> None:
        x = node.args[0]
        trees, shape = list(self.value_dims(x)), shape_of(x)
        dim, start, end, step = _slice_args(node)
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

    def _select(self, node: fx.Node) -> None:
        trees = list(self.value_dims(node.args[0]))
        dim = node.args[1] % len(trees)
        self.pin(trees[dim], f"an index is selected ({describe_node(node)})")
        self.dims[node] = trees[:dim] + trees[dim + 1:]

    def _embedding(self, node: fx.Node) -> None:
        weight, indices = node.args[:2]
        w = self.value_dims(weight)
        self.pin(w[0], "embedding rows are looked up by index")
        self.dims[node] = list(self.value_dims(indices)) + [w[1]]
        self._member(w[1], node, 1, "out")

    def _linear(self, node: fx.Node) -> None:
        x, w = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else None
        xs, ws = self.value_dims(x), self.value_dims(w)
        self.unify(xs[-1], ws[1])
        if bias is not None:
            self.unify(self.value_dims(bias)[0], ws[0])
        self.dims[node] = list(xs[:-1]) + [ws[0]]
        self._member(ws[0], node, 0, "out")
        self._member(ws[1], node, 1, "in")

    def _addmm(self, node: fx.Node) -> None:
        bias, a, b = node.args[:3]
        at, bt = self.value_dims(a), self.value_dims(b)
        self.unify(at[1], bt[0])
        out = [at[0], bt[1]]
        self._broadcast_into(out, shape_of(node), bias)
        self.dims[node] = out
        self._member(bt[1], node, 1, "out")
        self._member(bt[0], node, 0, "in")

    def _mm(self, node: fx.Node) -> None:
        a, b = node.args[:2]
        at, bt = self.value_dims(a), self.value_dims(b)
        for x, y in zip(at[:-2], bt[:-2]):
            self.unify(x, y)
        self.unify(at[-1], bt[-2])
        self.dims[node] = list(at[:-1]) + [bt[-1]]

    def _convolution(self, node: fx.Node) -> None:
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

    def _spatial(self, node: fx.Node) -> None:
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

    def _pad(self, node: fx.Node) -> None:
        x, pad = node.args[:2]
        trees = list(self.value_dims(x))
        for k in range(len(pad) // 2):
            d = len(trees) - 1 - k
            if pad[2 * k] or pad[2 * k + 1]:
                self.pin(trees[d], "padded dimension")
                trees[d] = self.fresh(shape_of(node)[d])
                self.pin(trees[d], "padded dimension")
        self.dims[node] = trees

    def _norm(self, node: fx.Node) -> None:
        """layer_norm(x, shape, w, b) / rms_norm(x, shape, w): the affine indexes the normalized dims."""
        x, normalized = node.args[:2]
        params = node.args[2:4] if node.target is aten.layer_norm.default else node.args[2:3]
        xs = self.value_dims(x)
        if isinstance(node.args[2], fx.Node):
            self.norm_weights.add(node.args[2].target)
        for p in params:
            if isinstance(p, fx.Node):
                for a, b in zip(self.value_dims(p), xs[len(xs) - len(normalized):]):
                    self.unify(a, b)
                self._member(self.value_dims(p)[-1], node, 0, "param")
        self.dims[node] = list(xs)

    def _group_norm(self, node: fx.Node) -> None:
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

    def _batch_norm(self, node: fx.Node) -> None:
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

    def _sdpa(self, node: fx.Node) -> None:
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


def _tensor_values(node: fx.Node) -> Iterator[torch.Tensor]:
    for value in [node.meta.get("val"), *(n.meta.get("val") for n in node.all_input_nodes)]:
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(v, torch.Tensor):
                yield v


def _slice_args(node: fx.Node) -> tuple[int, int, int, int]:
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


_RULES = {
    **dict.fromkeys(_SHAPE_ONLY, ChannelGraph._same),
    **dict.fromkeys(ALONG_DIM, ChannelGraph._along_dim),
    **dict.fromkeys(REDUCTIONS, ChannelGraph._reduction),
    **dict.fromkeys(VIEWS, ChannelGraph._view),
    **dict.fromkeys(_POOLS, ChannelGraph._spatial),
    aten.permute.default: ChannelGraph._permute,
    aten.transpose.int: ChannelGraph._transpose,
    aten.t.default: ChannelGraph._transpose,
    aten.unsqueeze.default: ChannelGraph._unsqueeze,
    aten.squeeze.dim: ChannelGraph._squeeze,
    aten.squeeze.dims: ChannelGraph._squeeze,
    aten.expand.default: ChannelGraph._expand,
    aten.cat.default: ChannelGraph._cat,
    aten.split_with_sizes.default: ChannelGraph._split,
    aten.split.Tensor: ChannelGraph._split,
    aten.slice.Tensor: ChannelGraph._slice,
    aten.select.int: ChannelGraph._select,
    aten.embedding.default: ChannelGraph._embedding,
    aten.linear.default: ChannelGraph._linear,
    aten.addmm.default: ChannelGraph._addmm,
    aten.mm.default: ChannelGraph._mm,
    aten.bmm.default: ChannelGraph._mm,
    aten.convolution.default: ChannelGraph._convolution,
    aten.constant_pad_nd.default: ChannelGraph._pad,
    aten.layer_norm.default: ChannelGraph._norm,
    aten.rms_norm.default: ChannelGraph._norm,
    aten.group_norm.default: ChannelGraph._group_norm,
    BATCH_NORM: ChannelGraph._batch_norm,
    SDPA: ChannelGraph._sdpa,
}


def analyze(program: Program) -> ChannelGraph:
    """The channel dependencies of ``program``."""
    return ChannelGraph(program)


def shrink(graph: ChannelGraph, keep: dict[Space, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
    """Remove channels from ``graph.program``: each root axis in ``keep`` keeps only the (sorted) indices given.

    ``values`` replaces constants (by target, same shape) before they are
    sliced: weights adjusted to make up for the removed channels.

    Constants are sliced into new tensors (the originals, shared with the
    user's model, are untouched; tied weights stay tied) and every op argument
    that spells a size (view shapes, normalized shapes, group counts, split
    sizes, slice bounds, the attention scale) is rewritten; shapes are then
    propagated and checked against the trees.
    """
    program = graph.program
    renamed: dict[int, str] = {}
    for node in program.graph.nodes:
        if node.op != "get_attr" or node.target not in graph.constant_dims():
            continue
        trees = graph.constant_dims()[node.target]
        if id(trees) not in renamed:
            value = (values or {}).get(node.target, program.get_constant(node.target))
            sliced, changed = value, node.target in (values or {})
            for d, tree in enumerate(trees):
                index = graph.kept(tree, keep)
                if len(index) != value.shape[d]:
                    sliced, changed = sliced.index_select(d, index.to(value.device)), True
            renamed[id(trees)] = add_constant(program, sliced.contiguous(), node.target) if changed else node.target
        node.target = renamed[id(trees)]
    drop_unread_constants(program)

    expected: dict[fx.Node, list[int]] = {}
    for node in program.graph.nodes:
        dims = graph.dims.get(node)
        if isinstance(dims, list):
            expected[node] = [len(graph.kept(t, keep)) for t in dims]
        if node.op == "call_function":
            _rewrite_sizes(graph, node, keep, expected)
    program.graph_module.recompile()
    propagate_meta(program.graph_module)
    for node, shape in expected.items():
        if shape_of(node) != shape:
            raise AssertionError(f"pruning predicted shape {shape} for {describe_node(node)}, got {shape_of(node)}")


def _new_sizes(args: list, old: list[int], new: list[int]) -> list:
    """Size arguments with the entries whose dim changed replaced (-1 stays -1: it is inferred)."""
    return [n if o != n and a != -1 else a for a, o, n in zip(args, old, new)]


def _rewrite_sizes(graph: ChannelGraph, node: fx.Node, keep: dict[Space, torch.Tensor],
                   expected: dict[fx.Node, list[int]]) -> None:
    target, args = node.target, list(node.args)
    if target in VIEWS or target is aten.expand.default:
        args[1] = _new_sizes(list(args[1]), shape_of(node), expected[node])
    elif target in (aten.layer_norm.default, aten.rms_norm.default):
        rank = len(args[1])
        args[1] = expected[args[0]][len(expected[args[0]]) - rank:]
    elif target is aten.convolution.default and node in graph.group_counts:
        args[8] = len(graph.kept(graph.group_counts[node], keep))
    elif target is aten.group_norm.default:
        args[1] = len(graph.kept(graph.group_counts[node], keep))
    elif target in (aten.split_with_sizes.default, aten.split.Tensor):
        dim = (args[2] if len(args) > 2 else 0) % len(shape_of(args[0]))
        node.target = aten.split_with_sizes.default
        args[1] = [len(graph.kept(piece[dim], keep)) for piece in graph.dims[node]]
    elif target is aten.slice.Tensor:
        dim, start, end, step = _slice_args(node)
        if step == 1 and (start, end) != (0, shape_of(args[0])[dim]):
            kept = graph.kept(graph.value_dims(args[0])[dim], keep)
            args[1:4] = [dim, int((kept < start).sum()), int((kept < end).sum())]
    elif target is SDPA and node.kwargs.get("scale") is None:
        head_dim = shape_of(args[0])[-1]
        if expected[args[0]][-1] != head_dim:
            node.kwargs = {**node.kwargs, "scale": 1 / math.sqrt(head_dim)}  # the softmax temperature stays
    node.args = tuple(args)
