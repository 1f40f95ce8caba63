"""Channel importance: how much each channel of a group matters, from its weights (L1/L2, normalization scales),
first-order Taylor saliency, or calibrated activations (CFSP), with a block-level weight for ``scope=global``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx as fx

from fxopt.calibration import Calibration, data_nodes, gradients, observe
from fxopt.ir.meta import shape_of
from fxopt.passes.base import PassContext
from fxopt.prune.dependency import ChannelGraph
from fxopt.prune.groups import Group, Space

__all__ = ["Importance", "ChannelScores"]

Importance = Literal["l1", "l2", "bn-scale", "taylor", "activation", "random"]

aten = torch.ops.aten


class ChannelScores:
    """Channel importance for every group; data-driven kinds gather their statistics in one calibration run."""

    def __init__(self, graph: ChannelGraph, groups: list[Group], kind: str, ctx: PassContext):
        self.graph, self.kind = graph, kind
        self.saliency: dict[str, torch.Tensor] = {}  # taylor: sum over batches of |weight * grad|
        self.activation: dict[Space, torch.Tensor] = {}  # activation: squared norm of each channel's input
        self.block: dict[Space, float] = {}  # activation: angular distance the group's residual block moves the stream
        if kind == "taylor":
            calibration = ctx.require_calibration("importance=taylor")
            targets = {t for g in groups for t, _ in g.constants}
            gradients(graph.program, calibration, targets, self._add_saliency)
        elif kind == "activation":
            self._observe_activations(groups, ctx.require_calibration("importance=activation"))

    def __call__(self, group: Group, index: int) -> torch.Tensor | None:
        """One score per channel of the group (higher is more important), or None if the kind does not apply."""
        if self.kind == "random":
            return torch.rand(group.size, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        if self.kind == "bn-scale":
            return self._per_channel(group, lambda t: t in self.graph.norm_weights, 1)
        if self.kind == "taylor":
            return self._per_channel(group, lambda t: t in self.saliency, 1, self.saliency.get)
        weights = self._per_channel(
            group, lambda t: self.graph.program.get_constant(t).dim() >= 2, 2 if self.kind == "l2" else 1
        )
        if self.kind == "activation" and weights is not None and group.space in self.activation:
            # Wanda / CFSP: a channel matters by its weights times the size of what flows through it.
            return weights * self.activation[group.space].sqrt()
        return weights

    def weight(self, group: Group) -> float:
        """How much the group's block matters relative to others (CFSP's coarse, block-level importance)."""
        if group.space not in self.block:
            return 1.0
        mean = sum(self.block.values()) / len(self.block)
        return self.block[group.space] / mean if mean > 0 else 1.0

    def _per_channel(
        self, group: Group, use: Callable[[str], bool], power: int, tensor: Callable[[str], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """Sum ``|tensor|**power`` of the group's constants over every position that belongs to each channel."""
        scores = torch.zeros(group.size, dtype=torch.float64)
        found = False
        for target, dim in group.constants:
            if not use(target):
                continue
            found = True
            value = (tensor or self.graph.program.get_constant)(target).detach().double().abs().pow(power)
            per_position = value.sum([d for d in range(value.dim()) if d != dim]) if value.dim() > 1 else value
            coordinates = self.graph.coordinates(self.graph.constant_dims()[target][dim], group.space)
            valid = coordinates >= 0
            scores.index_add_(0, coordinates[valid], per_position.cpu()[valid])
        return scores if found else None

    def _add_saliency(self, target: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        term = (weight * grad).abs().double()
        self.saliency[target] = self.saliency[target] + term if target in self.saliency else term

    def _observe_activations(self, groups: list[Group], calibration: Calibration) -> None:
        program, graph = self.graph.program, self.graph
        data = data_nodes(program)
        watch: dict[fx.Node, list[Callable[[torch.Tensor], None]]] = {}
        for group in groups:
            # What the group's consumers read: their activation inputs along the group's channels.
            readers = [m.node for m in group.members if m.role == "in"]
            inputs = {a for r in readers for a in r.all_input_nodes if a in data}
            if not inputs:
                inputs = {m.node for m in group.members if m.role == "out" and m.node in data}
            for value in inputs:
                for d, tree in enumerate(graph.value_dims(value)):
                    coordinates = graph.coordinates(tree, group.space)
                    if (coordinates >= 0).any():
                        watch.setdefault(value, []).append(self._accumulator(group.space, d, coordinates))
            self._watch_block(group.space, readers, data, watch)
        observe(program, calibration, {n: _all(fns) for n, fns in watch.items()})

    def _accumulator(self, space: Space, dim: int, coordinates: torch.Tensor) -> Callable[[torch.Tensor], None]:
        valid = coordinates >= 0

        def accumulate(value: torch.Tensor) -> None:
            squares = value.detach().double().pow(2)
            per_position = squares.sum([d for d in range(value.dim()) if d != dim])
            total = self.activation.setdefault(space, torch.zeros(space.size, dtype=torch.float64))
            total.index_add_(0, coordinates[valid], per_position[valid])

        return accumulate

    def _watch_block(
        self,
        space: Space,
        readers: list[fx.Node],
        data: set[fx.Node],
        watch: dict[fx.Node, list[Callable[[torch.Tensor], None]]],
    ) -> None:
        """Measure the residual block around ``readers``: 1 - cos(stream in, stream out), averaged over samples."""
        found = _residual_add(readers, data)
        if found is None:
            return
        stream, add = found
        held: list[torch.Tensor] = []
        angles: list[float] = []

        def keep(value: torch.Tensor) -> None:
            held.append(value.detach())

        def compare(value: torch.Tensor) -> None:
            before = held.pop(0).flatten(1).double()
            after = value.detach().flatten(1).double()
            cosine = torch.nn.functional.cosine_similarity(before, after, dim=1).clamp(-1, 1)
            angles.extend((torch.arccos(cosine) / math.pi).tolist())
            self.block[space] = sum(angles) / len(angles)

        watch.setdefault(stream, []).append(keep)
        watch.setdefault(add, []).append(compare)


def _all(callbacks: list[Callable[[torch.Tensor], None]]) -> Callable[[torch.Tensor], None]:
    def call(value: torch.Tensor) -> None:
        for callback in callbacks:
            callback(value)

    return call


def _residual_add(readers: list[fx.Node], data: set[fx.Node], depth: int = 6) -> tuple[fx.Node, fx.Node] | None:
    """The first residual ``add(stream, branch)`` downstream of ``readers`` within ``depth`` ops: (stream, add)."""
    frontier = [(r, r) for r in readers]
    for _ in range(depth):
        following = []
        for node, came_from in frontier:
            if node.target is aten.add.Tensor and node is not came_from:
                others = [a for a in node.args[:2] if isinstance(a, fx.Node) and a is not came_from and a in data]
                if len(others) == 1 and shape_of(others[0]) == shape_of(node) and shape_of(came_from) == shape_of(node):
                    return others[0], node
            following += [(user, node) for user in node.users]
        frontier = following
    return None
