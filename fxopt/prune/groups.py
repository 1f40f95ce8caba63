"""The vocabulary of channel dependencies: channel axes (:class:`Space`), the index trees over them that
describe each tensor dimension, and the groups of channels pruned together (see :mod:`fxopt.prune.dependency`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx

from fxopt.ir.meta import module_name

__all__ = ["Space", "Leaf", "Cat", "Prod", "Tree", "Member", "Group"]


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
    # Normalized together (a layer or RMS norm's statistics): removing even all-zero channels changes the others.
    normalized: bool = False

    @property
    def size(self) -> int:
        return self.space.size

    def describe(self) -> str:
        """``out: conv 'layer1.conv' | in: linear 'fc' | param: bn ...``-style summary of the members."""
        return ", ".join(dict.fromkeys(f"{m.role} {m.label}" for m in self.members))

    def summary(self) -> str:
        """``group of 64 (out conv 'layer1.conv', ...)``: its size and members, for notes."""
        return f"group of {self.size} ({self.describe()})"


def _short(node: fx.Node) -> str:
    op = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    return f"{_OP_NAMES.get(op, op)} '{module_name(node) or node.name}'"


_OP_NAMES = {
    "convolution": "conv",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "scaled_dot_product_attention": "attention",
}
