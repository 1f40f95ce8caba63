"""Choosing what to prune: rank each group's channels and find the kept counts that meet the pruning target
(FLOPs, parameters or channels; uniform, global or per-layer ratios)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from fxopt.ir.analysis import node_flops
from fxopt.ir.layers import layer_matches, require_matches
from fxopt.ir.meta import dtype_of, has_symbolic_shapes, module_name
from fxopt.ir.program import Program
from fxopt.passes.base import PassContext
from fxopt.prune.dependency import ChannelGraph, analyze
from fxopt.prune.groups import Group, Space
from fxopt.prune.importance import ChannelScores, removal_order
from fxopt.prune.latency import snap_to_latency

if TYPE_CHECKING:
    from fxopt.passes.prune_channels import PruneChannels

__all__ = ["Candidate", "PrunePlan", "plan_pruning", "Cost"]


@dataclass
class Candidate:
    group: Group
    importance: torch.Tensor  # float64, one per channel
    minimum: int
    step: int
    weight: float = 1.0  # the group's importance relative to others, for scope=global

    def removable(self, wanted: int) -> int:
        """How many of ``wanted`` channels can go, given the minimum and the rounding of the kept count."""
        size = self.group.size
        kept = size - max(0, min(wanted, size))
        kept = min(size, math.ceil(kept / self.step) * self.step)
        return size - max(kept, self.minimum)


@dataclass
class PrunePlan:
    """What :class:`PruneChannels` removes: the analysis, the ranked groups and the kept count of each."""

    graph: ChannelGraph
    candidates: list[Candidate]
    counts: dict[Space, int]  # kept channels per group axis

    @property
    def removed(self) -> int:
        return sum(c.group.size - self.counts[c.group.space] for c in self.candidates)

    def keep(self) -> dict[Space, torch.Tensor]:
        """The kept channel indices of every pruned group: its most important ones, in their original order."""
        keep = {}
        for c in self.candidates:
            kept = self.counts[c.group.space]
            if kept < c.group.size:
                order = torch.argsort(c.importance, descending=True, stable=True)
                keep[c.group.space] = order[:kept].sort().values
        return keep


def plan_pruning(program: Program, options: PruneChannels, ctx: PassContext) -> PrunePlan | None:
    """Analyze ``program``, rank its channels and choose how many each group keeps to meet ``options.ratio``."""
    if has_symbolic_shapes(program.graph):
        ctx.skip("the graph", "it has dynamic (symbolic) dimensions; capture with static shapes to prune")
        return None
    graph = analyze(program)
    groups, pinned = graph.groups()
    layers = [m.node for g in groups + [g for g, _ in pinned] for m in g.members if m.role == "out"]
    patterns = [("ignore", p) for p in options.ignore] + [("layer-ratios", p) for p, _ in _layer_ratios(options)]
    require_matches(program, layers, patterns, "`fxopt prune --explain` lists them")
    for group, why in pinned:
        if any(m.role == "out" for m in group.members):  # a layer's channels, not a kernel or vocabulary axis
            ctx.skip(group.summary(), why)
    candidates = []
    excluded_by = {g.space: _excluded(g, options) for g in groups}
    scores = ChannelScores(graph, [g for g in groups if not excluded_by[g.space]], options.importance, ctx)
    for group in groups:
        excluded = excluded_by[group.space]
        importance = None if excluded else scores(group, len(candidates))
        if excluded or importance is None:
            ctx.skip(group.summary(), excluded or _unscored(options.importance))
            continue
        step = 1 if "heads" in group.roles else options.round_to
        candidates.append(
            Candidate(group, importance, min(options.min_channels, group.size), step, scores.weight(group))
        )
    ctx.count("groups", len(candidates))
    cost = Cost(graph, options.target, candidates)
    full = cost({})
    if options.importance == "fisher":
        # Fisher scores are an expected loss change, comparable across groups: channels are ranked by the loss
        # their removal adds per unit of the target it saves (a head costs far more FLOPs than an MLP neuron).
        unit_costs = {c.group.space: max(full - cost({c.group.space: c.group.size - 1}), 1e-12) for c in candidates}
        order = removal_order({c.group.space: scores.samples(c.group.space) for c in candidates}, unit_costs)
        for c in candidates:
            c.importance = order[c.group.space]
    counts = solve(candidates, options, cost, full, ctx)
    if options.latency:
        counts, whole = snap_to_latency(graph, candidates, counts, cost, ctx, restore=True)
        if whole:  # meet the target in the groups where pruning pays instead
            rest = [c for c in candidates if c.group.space not in whole]
            counts = {**{space: space.size for space in whole}, **solve(rest, options, cost, full, ctx)}
            counts, _ = snap_to_latency(graph, rest, counts, cost, ctx, restore=False)
    plan = PrunePlan(graph, candidates, counts)
    asked = "per-layer ratios" if options.layer_ratios else f"asked {options.ratio:.1%}"
    ctx.notes.append(
        f"{options.target} reduced by {1 - cost(counts) / full:.1%} ({asked})" if full > 0 else "nothing to prune"
    )
    for c in candidates:
        kept = counts[c.group.space]
        if kept < c.group.size:
            ctx.notes.append(f"{c.group.size} -> {kept} channels: {c.group.describe()}")
    return plan


def solve(
    candidates: list[Candidate], options: PruneChannels, cost: Cost, full: float, ctx: PassContext
) -> dict[Space, int]:
    """The kept count of each candidate at the smallest pruning level that brings ``cost`` within the budget.

    ``scope=per-layer-ratios`` has no budget: each group loses the channel
    fraction given for its layers.
    """
    if options.scope == "per-layer-ratios":
        return {
            c.group.space: c.group.size - c.removable(math.floor(_group_ratio(c.group, options) * c.group.size))
            for c in candidates
        }
    wanted = schedule(candidates, options.scope, normalize=options.importance != "fisher")
    budget = full * (1 - options.ratio)
    level = 1.0  # the smallest level that meets the budget, or everything prunable
    most = cost(wanted(level))
    if full > 0 and most <= budget:
        low = 0.0
        for _ in range(40):
            middle = (low + level) / 2
            if cost(wanted(middle)) <= budget:
                level = middle
            else:
                low = middle
    elif options.ratio > 0:
        ctx.notes.append(
            f"only {1 - most / full if full > 0 else 0.0:.1%} of the {options.target} can be "
            f"removed (asked {options.ratio:.1%}): the rest is pinned or at min-channels"
        )
    return wanted(level)


def _layer_ratios(options: PruneChannels) -> list[tuple[str, float]]:
    return [(pattern, float(value)) for pattern, _, value in (e.rpartition(":") for e in options.layer_ratios)]


def _group_ratio(group: Group, options: PruneChannels) -> float:
    """The channel fraction of the first layer-ratios pattern matching one of the group's layers, else ``ratio``."""
    layers = [m.node for m in group.members if m.role == "out"]
    return next((r for p, r in _layer_ratios(options) if any(layer_matches(n, p) for n in layers)), options.ratio)


def _unscored(importance: str) -> str:
    if importance == "bn-scale":
        return "no normalization scale in the group"
    return f"importance={importance} has no score for it: no layer with a weight of its own reads its channels"


def _excluded(group: Group, options: PruneChannels) -> str | None:
    if "heads" in group.roles and not options.heads:
        return "attention heads (heads=false)"
    if "head-dim" in group.roles and not options.head_dim:
        return "attention head dimension (head-dim=false)"
    for member in group.members:
        if member.role == "out" and any(layer_matches(member.node, p) for p in options.ignore):
            return f"its output layer is ignored ({module_name(member.node) or member.node.name})"
    return None


def schedule(candidates: list[Candidate], scope: str, normalize: bool = True) -> Callable[[float], dict[Space, int]]:
    """``wanted(x)``: the kept count of every group at pruning level ``x`` in [0, 1] (monotone in ``x``).

    ``scope=global`` compares scores across groups after dividing each group's by its mean, unless they are
    comparable as they are (``normalize=False``).
    """
    if scope == "uniform":
        return lambda x: {
            c.group.space: c.group.size - c.removable(math.floor(x * c.group.size + 1e-9)) for c in candidates
        }
    normalized = []
    for c in candidates:
        mean = c.importance.mean() if normalize else 1.0
        normalized.append(c.importance * (c.weight / mean) if mean > 0 else torch.zeros_like(c.importance))
    sorted_scores = [n.sort().values for n in normalized]
    # Level x removes the channels below the x-quantile of all scores: bisection then works at any score scale.
    every = torch.cat(sorted_scores).sort().values if sorted_scores else torch.zeros(0, dtype=torch.float64)

    def wanted(x: float) -> dict[Space, int]:
        threshold = float(every[math.floor(x * len(every))]) if x < 1 and len(every) else math.inf
        return {
            c.group.space: c.group.size - c.removable(int(torch.searchsorted(s, threshold)))
            for c, s in zip(candidates, sorted_scores)
        }

    return wanted


class Cost:
    """The target measure of the whole program (FLOPs, parameters or channels) for a plan's kept counts."""

    def __init__(self, graph: ChannelGraph, target: str, candidates: list[Candidate]):
        self.graph, self.target, self.candidates = graph, target, candidates
        program = graph.program
        self.flop_nodes = [n for n in program.graph.nodes if node_flops(n) > 0]
        self.constants = list({id(trees): trees for trees in graph.constant_dims().values()}.values())

    def __call__(self, counts: dict[Space, int]) -> float:
        if self.target == "channels":
            return float(sum(counts.get(c.group.space, c.group.size) for c in self.candidates))
        if self.target == "params":
            return float(sum(math.prod(self.graph.kept_size(t, counts) for t in trees) for trees in self.constants))
        return float(sum(node_flops(n, self.shaped(counts)) for n in self.flop_nodes))

    def shaped(self, counts: dict[Space, int]) -> Callable[[fx.Node], object]:
        def value(node: fx.Node) -> object:
            dims = self.graph.value_dims(node)
            if not dims and not isinstance(node.meta.get("val"), torch.Tensor):
                return node.meta.get("val")
            shape = [self.graph.kept_size(t, counts) for t in dims]
            return torch.empty(shape, dtype=dtype_of(node), device="meta")

        return value
