"""Channel importance: how much each channel of a group matters, from its weights (L1/L2, normalization scales),
first-order Taylor saliency, or calibrated activations (CFSP), with a block-level weight for ``scope=global``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.calibration import Calibration, data_nodes, gradients, observe, watching
from fxopt.errors import FxoptError
from fxopt.ir.meta import shape_of
from fxopt.passes.base import PassContext
from fxopt.prune.dependency import ChannelGraph
from fxopt.prune.groups import Group, Space
from fxopt.prune.rules import layer_weight

__all__ = ["Importance", "ChannelScores"]

Importance = Literal["l1", "l2", "bn-scale", "taylor", "activation", "fisher", "random"]

# Random output projections per calibration batch for the Fisher information of unlabeled data.
PROJECTIONS = 4
# Weight of the interactions (off-diagonal Fisher terms) in the removal order. Estimated from a few dozen gradient
# samples they are noisy: on MiniLM (96 samples) their full weight cost 2 points of cosine at 30% fewer FLOPs,
# a quarter matched the diagonal alone at 30% and was 0.4 points better at 50%.
INTERACTION = 0.25

aten = torch.ops.aten


class ChannelScores:
    """Channel importance for every group; data-driven kinds gather their statistics in one calibration run."""

    def __init__(self, graph: ChannelGraph, groups: list[Group], kind: str, ctx: PassContext):
        self.graph, self.kind = graph, kind
        self.saliency: dict[str, torch.Tensor] = {}  # taylor: sum over batches of |weight * grad|
        self.activation: dict[Space, torch.Tensor] = {}  # activation: squared norm of each channel's input
        self.block: dict[Space, float] = {}  # activation: angular distance the group's residual block moves the stream
        self.mask_gradients: dict[Space, list[torch.Tensor]] = {}  # fisher: one per batch and projection
        if kind == "taylor":
            calibration = ctx.require_calibration("importance=taylor")
            targets = {t for g in groups for t, _ in g.constants}
            gradients(graph.program, calibration, targets, self._add_saliency)
        elif kind == "activation":
            self._observe_activations(groups, ctx.require_calibration("importance=activation"))
        elif kind == "fisher":
            self._fisher(groups, ctx.require_calibration("importance=fisher"))

    def __call__(self, group: Group, index: int) -> torch.Tensor | None:
        """One score per channel of the group (higher is more important), or None if the kind does not apply."""
        if self.kind == "random":
            return torch.rand(group.size, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        if self.kind == "bn-scale":
            return self._per_channel(group, lambda t: t in self.graph.norm_weights, 1)
        if self.kind == "taylor":
            return self._per_channel(group, lambda t: t in self.saliency, 1, self.saliency.get)
        if self.kind == "fisher":
            samples = self.samples(group.space)
            return None if samples is None else samples.square().sum(1)
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

    def _fisher(self, groups: list[Group], calibration: Calibration) -> None:
        """Kwon et al.'s Fisher information of a mask on each channel, from the layers that read the channels.

        A mask ``m`` on the channels a layer reads has gradient ``Σ_o W[o, i] ∂L/∂W[o, i]`` for channel ``i``, so
        the weights' gradients give it. ``L`` is the calibration's loss; without one, ``v · y`` for random
        Gaussian ``v`` over the outputs ``y`` (a few per batch), whose squared gradient is on average
        ``Σ_k (∂y_k/∂m)²``: the curvature of the squared distance to the unpruned outputs, which is 0 at ``m = 1``.
        """
        readers: dict[str, list[tuple[Space, int, torch.Tensor]]] = {}
        for group in groups:
            for member in group.members:
                reader = layer_weight(member.node) if member.role == "in" else None
                if reader is None:
                    continue
                tree = self.graph.constant_dims()[reader.target][member.dim]
                readers.setdefault(reader.target, []).append(
                    (group.space, member.dim, self.graph.coordinates(tree, group.space))
                )
        generator = torch.Generator().manual_seed(0)
        draws = 1 if calibration.loss else PROJECTIONS
        for batch in calibration.batches:
            for _ in range(draws):
                grads: dict[Space, torch.Tensor] = {}

                def add(target: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
                    product = (weight * grad).double()
                    for space, dim, coordinates in readers[target]:
                        per_position = product.sum([d for d in range(product.dim()) if d != dim]).cpu()
                        valid = coordinates >= 0
                        total = grads.setdefault(space, torch.zeros(space.size, dtype=torch.float64))
                        total.index_add_(0, coordinates[valid], per_position[valid])

                loss = calibration.loss or _projection(generator)
                gradients(self.graph.program, replace(calibration, batches=(batch,), loss=loss), set(readers), add)
                for space, grad in grads.items():
                    self.mask_gradients.setdefault(space, []).append(grad)

    def samples(self, space: Space) -> torch.Tensor | None:
        """fisher: the mask gradients of the group's channels, one column per batch and projection; the Fisher
        information matrix is ``samples @ samples.T``."""
        grads = self.mask_gradients.get(space)
        return torch.stack(grads, 1) if grads else None

    def _add_saliency(self, target: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        term = (weight * grad).abs().double()
        self.saliency[target] = self.saliency[target] + term if target in self.saliency else term

    def _observe_activations(self, groups: list[Group], calibration: Calibration) -> None:
        program, graph = self.graph.program, self.graph
        data = data_nodes(program)
        watch: list[tuple[fx.Node, Callable[[torch.Tensor], None]]] = []
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
                        watch.append((value, self._accumulator(group.space, d, coordinates)))
            self._watch_block(group.space, readers, data, watch)
        observe(program, calibration, watching(watch))

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
        watch: list[tuple[fx.Node, Callable[[torch.Tensor], None]]],
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

        watch += [(stream, keep), (add, compare)]


def removal_order(samples: dict[Space, torch.Tensor], unit_costs: dict[Space, float]) -> dict[Space, torch.Tensor]:
    """Each channel's place in a greedy removal order (higher goes later): Kwon et al.'s Fisher mask search with
    the interactions of the channels removed from one group.

    Removing the set ``S`` of a group's channels costs about ``1_Sᵀ F 1_S`` (``F = samples @ samples.T``, the
    group's Fisher matrix, its off-diagonal terms weighted by :data:`INTERACTION`); each step removes, across
    groups, the channel whose removal adds the least cost per unit of the target it saves (``unit_costs``).
    """
    added = {s: g.square().sum(1) for s, g in samples.items()}  # the cost each channel's removal adds now
    removed_sum = {s: torch.zeros(g.shape[1], dtype=g.dtype) for s, g in samples.items()}  # Σ_{j∈S} samples[j]
    removed = {s: torch.zeros(len(g), dtype=torch.bool) for s, g in samples.items()}
    order = {s: torch.zeros(len(g), dtype=torch.float64) for s, g in samples.items()}
    best = {s: _cheapest(added[s], unit_costs[s]) for s in samples}
    for step in range(sum(len(g) for g in samples.values())):
        space = min(best, key=lambda s: best[s][0])
        index = best[space][1]
        order[space][index], removed[space][index] = step, True
        # cost(S + i) - cost(S) = F_ii + 2 Σ_{j∈S} F_ij, kept up to date as S grows.
        removed_sum[space] += samples[space][index]
        added[space] = samples[space].square().sum(1) + 2 * INTERACTION * samples[space] @ removed_sum[space]
        added[space][removed[space]] = math.inf
        best[space] = _cheapest(added[space], unit_costs[space])
    return order


def _cheapest(added: torch.Tensor, unit_cost: float) -> tuple[float, int]:
    index = int(added.argmin())
    return float(added[index]) / unit_cost, index


def _projection(generator: torch.Generator) -> Callable[[object], torch.Tensor]:
    """A loss ``Σ v · y`` over the floating outputs with fresh standard Gaussian ``v``."""

    def loss(outputs: object) -> torch.Tensor:
        tensors = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not tensors:
            raise FxoptError("importance=fisher needs floating outputs, or Calibration(loss=...)")
        return sum((torch.randn(t.shape, generator=generator).to(t) * t).sum() for t in tensors)

    return loss


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
