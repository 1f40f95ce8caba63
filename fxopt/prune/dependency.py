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

The unification and the groups are here; each op's rule is in :mod:`fxopt.prune.rules`, the rewrite that removes
channels in :mod:`fxopt.prune.shrink`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator

import torch
import torch.fx as fx

from fxopt.ir.layers import is_call
from fxopt.ir.meta import describe_node, shape_of
from fxopt.ir.program import Program
from fxopt.prune.groups import Cat, Group, Leaf, Member, Prod, Space, Tree
from fxopt.prune.rules import RULES, OpRules, tensor_values

__all__ = ["ChannelGraph", "analyze"]


class ChannelGraph(OpRules):
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
        self.normalized: list[Tree] = []  # dims a layer or RMS norm takes its statistics over
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

        def groups_of(tree: Tree) -> list[Group]:
            return [found[space] for space in dict.fromkeys(self.leaves(tree)) if space in found]

        for tree, member in self._members:
            for group in groups_of(tree):
                group.members.append(member)
        for tree, role in self._roles:
            for group in groups_of(tree):
                group.roles.add(role)
        for tree in self.normalized:
            for group in groups_of(tree):
                group.normalized = True
        weighted = [g for g in found.values() if any(self.program.get_constant(t).dim() >= 2 for t, _ in g.constants)]
        return (
            [g for g in weighted if g.space not in pinned],
            [(g, pinned[g.space]) for g in weighted if g.space in pinned],
        )

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
                    self._constants[node.target] = (
                        self._constants[tied] if tied else [self.fresh(s) for s in value.shape]
                    )
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
        if not all(isinstance(s, int) for v in tensor_values(node) for s in v.shape):
            self._opaque(node, "dynamic shape")
            return
        if is_call(node, operator.getitem):
            source = self.dims.get(node.args[0])
            self.dims[node] = source[node.args[1]] if isinstance(source, tuple) else self._new(node)
            if not isinstance(source, tuple):
                self.pin_all(node, "getitem of an op without a rule")
            return
        rule = RULES.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
            rule = OpRules._pointwise
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
            self.dims[node] = tuple(
                [self.fresh(s) for s in v.shape] if isinstance(v, torch.Tensor) else [] for v in value
            )
            for dims in self.dims[node]:
                for t in dims:
                    self.pin(t, why)
        else:
            self.dims[node] = self._new(node)
            self.pin_all(node, why)

    def _member(self, tree: Tree, node: fx.Node, dim: int, role: str) -> None:
        self._members.append((tree, Member(node, dim, role)))


def analyze(program: Program) -> ChannelGraph:
    """The channel dependencies of ``program``."""
    return ChannelGraph(program)
