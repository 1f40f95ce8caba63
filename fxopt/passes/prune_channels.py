"""Structured pruning: remove whole channels, neurons and attention heads, leaving a smaller dense model."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.errors import PassError
from fxopt.ir.analysis import node_flops
from fxopt.ir.channels import ChannelGraph, Group, Space, analyze, shrink
from fxopt.ir.meta import dtype_of, module_name
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option

__all__ = ["PruneChannels", "PrunePlan", "plan_pruning"]

Importance = Literal["l1", "l2", "bn-scale", "random"]


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important channels, neurons and attention heads; the result is an ordinary dense model.

    Channel groups come from :mod:`fxopt.ir.channels`: every dimension that
    must shrink with a conv's or linear's output channels (the norm and
    bias after it, the next layers' inputs, both sides of residual adds,
    concatenations, grouped and depthwise convs, attention heads with their
    Q/K/V/O projections, grouped-query K/V heads, gated MLPs). Dimensions
    reaching a model input or output, or an op without a pruning rule, are
    never changed (the notes say which and why).

    ``ratio`` is the fraction of ``target`` removed: FLOPs or parameters of
    the whole model, or channels of the prunable groups. ``scope=uniform``
    removes the same fraction of every group; ``global`` ranks all channels
    by importance normalized per group (its mean) and removes the lowest
    across groups. Importance: ``l1``/``l2`` norms of the weights that read
    and write each channel, ``bn-scale`` the absolute scale of the
    normalizations in the group (groups without one are left alone),
    ``random`` a seeded baseline. Attention heads are removed whole
    (``heads``; head_dim kept) and head_dim only with ``head-dim=true``.

    Lossy: outputs change by the removed channels' contribution (the report
    gives the error against the unpruned model); channels whose weights are
    all exactly zero are removed first and without changing any output.
    Run on the captured graph before ``fold-conv-bn`` (``bn-scale`` needs the
    BatchNorms) and ``fuse-blocks``.
    """

    name = "prune-channels"
    exact = False
    before = ("fold-conv-bn", "fuse-blocks")
    ratio: float = option(0.3, "fraction of the target removed, in [0, 1)")
    target: Literal["flops", "params", "channels"] = option("flops", "what the ratio is a fraction of")
    importance: Importance = option("l1", "how channels are ranked")
    scope: Literal["uniform", "global"] = option("uniform", "same ratio per group, or one ranking across groups")
    round_to: int = option(1, "kept channels per group are a multiple of this (heads excepted)")
    min_channels: int = option(1, "fewest channels (or heads) a group keeps")
    heads: bool = option(True, "remove whole attention heads")
    head_dim: bool = option(False, "shrink every head's dimension")
    ignore: tuple[str, ...] = option((), "layers whose output channels stay (module path or weight name globs)")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError("round-to and min-channels must be at least 1")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        if self.ratio == 0:
            return False
        plan = plan_pruning(program, self, ctx)
        if plan is None or not plan.removed:
            return False
        shrink(plan.graph, plan.keep())
        ctx.count("channels-removed", plan.removed)
        ctx.count("groups-pruned", sum(1 for c in plan.candidates if plan.counts[c.group.space] < c.group.size))
        return True


@dataclass
class _Candidate:
    group: Group
    importance: torch.Tensor  # float64, one per channel
    minimum: int
    step: int

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
    candidates: list[_Candidate]
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
    if any(not isinstance(s, int) for n in program.graph.nodes
           if isinstance(n.meta.get("val"), torch.Tensor) for s in n.meta["val"].shape):
        ctx.skip("the graph", "it has dynamic (symbolic) dimensions; capture with static shapes to prune")
        return None
    graph = analyze(program)
    groups, pinned = graph.groups()
    layers = [m.node for g in groups + [g for g, _ in pinned] for m in g.members if m.role == "out"]
    for pattern in options.ignore:
        if not any(_matches(node, pattern) for node in layers):
            example = next((module_name(n) for n in layers if module_name(n)), "layer1.0.conv1")
            raise PassError(f"ignore pattern {pattern!r} matches no layer of {program.name}; layers are named by "
                            f"module path or weight name, e.g. {example!r} (`fxopt prune --explain` lists them)")
    for group, why in pinned:
        if any(m.role == "out" for m in group.members):  # a layer's channels, not a kernel or vocabulary axis
            ctx.skip(_label(group), why)
    candidates = []
    for group in groups:
        excluded = _excluded(group, options)
        importance = None if excluded else _importance(graph, group, options.importance, len(candidates))
        if excluded or importance is None:
            ctx.skip(_label(group), excluded or "no normalization scale in the group")
            continue
        step = 1 if "heads" in group.roles else options.round_to
        candidates.append(_Candidate(group, importance, min(options.min_channels, group.size), step))
    ctx.count("groups", len(candidates))
    cost = _Cost(graph, options.target, candidates)
    wanted = _schedule(candidates, options.scope)
    full = cost(wanted(0.0))
    budget = full * (1 - options.ratio)
    level = 1.0  # the pruning level of the plan: the smallest that meets the budget, or everything prunable
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
        ctx.notes.append(f"only {1 - most / full if full > 0 else 0.0:.1%} of the {options.target} can be "
                         f"removed (asked {options.ratio:.1%}): the rest is pinned or at min-channels")
    counts = wanted(level)
    plan = PrunePlan(graph, candidates, counts)
    ctx.notes.append(f"{options.target} reduced by {1 - cost(counts) / full:.1%} (asked {options.ratio:.1%})"
                     if full > 0 else "nothing to prune")
    for c in candidates:
        kept = counts[c.group.space]
        if kept < c.group.size:
            ctx.notes.append(f"{c.group.size} -> {kept} channels: {c.group.describe()}")
    return plan


def _excluded(group: Group, options: PruneChannels) -> str | None:
    if "heads" in group.roles and not options.heads:
        return "attention heads (heads=false)"
    if "head-dim" in group.roles and not options.head_dim:
        return "attention head dimension (head-dim=false)"
    for member in group.members:
        if member.role == "out" and any(_matches(member.node, p) for p in options.ignore):
            return f"its output layer is ignored ({module_name(member.node) or member.node.name})"
    return None


def _label(group: Group) -> str:
    return f"group of {group.size} ({group.describe()})"


def _matches(node: fx.Node, pattern: str) -> bool:
    names = [module_name(node) or node.name, node.name] + [a.target for a in node.all_input_nodes
                                                            if a.op == "get_attr"]
    return any(fnmatch.fnmatchcase(str(n), pattern) for n in names)


def _importance(graph: ChannelGraph, group: Group, kind: str, index: int) -> torch.Tensor | None:
    """One score per channel of the group; higher is more important."""
    if kind == "random":
        return torch.rand(group.size, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    scores = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for target, dim in group.constants:
        value = graph.program.get_constant(target)
        if kind == "bn-scale" and target not in graph.norm_weights:
            continue
        if kind in ("l1", "l2") and value.dim() < 2:
            continue  # biases and norm affines: weights say what a channel does
        found = True
        power = 2 if kind == "l2" else 1
        per_position = value.detach().double().abs().pow(power)
        per_position = per_position.sum([d for d in range(value.dim()) if d != dim]) if value.dim() > 1 else per_position
        coordinates = graph.coordinates(graph.constant_dims()[target][dim], group.space)
        valid = coordinates >= 0
        scores.index_add_(0, coordinates[valid], per_position.cpu()[valid])
    return scores if found else None


def _schedule(candidates: list[_Candidate], scope: str) -> Callable[[float], dict[Space, int]]:
    """``wanted(x)``: the kept count of every group at pruning level ``x`` in [0, 1] (monotone in ``x``)."""
    if scope == "uniform":
        return lambda x: {c.group.space: c.group.size - c.removable(math.floor(x * c.group.size + 1e-9))
                          for c in candidates}
    normalized = []
    for c in candidates:
        mean = c.importance.mean()
        normalized.append(c.importance / mean if mean > 0 else torch.zeros_like(c.importance))
    top = max((float(n.max()) for n in normalized), default=0.0) + 1.0
    sorted_scores = [n.sort().values for n in normalized]

    def wanted(x: float) -> dict[Space, int]:
        threshold = x * top if x < 1 else math.inf
        return {c.group.space: c.group.size - c.removable(int(torch.searchsorted(s, threshold)))
                for c, s in zip(candidates, sorted_scores)}

    return wanted


class _Cost:
    """The target measure of the whole program (FLOPs, parameters or channels) for a plan's kept counts."""

    def __init__(self, graph: ChannelGraph, target: str, candidates: list[_Candidate]):
        self.graph, self.target, self.candidates = graph, target, candidates
        program = graph.program
        self.flop_nodes = [n for n in program.graph.nodes if node_flops(n) > 0]
        self.constants = list({id(trees): trees for trees in graph.constant_dims().values()}.values())

    def __call__(self, counts: dict[Space, int]) -> float:
        if self.target == "channels":
            return float(sum(counts[c.group.space] for c in self.candidates))
        if self.target == "params":
            return float(sum(math.prod(self.graph.kept_size(t, counts) for t in trees) for trees in self.constants))
        return float(sum(node_flops(n, self._shaped(counts)) for n in self.flop_nodes))

    def _shaped(self, counts: dict[Space, int]) -> Callable[[fx.Node], object]:
        def value(node: fx.Node) -> object:
            dims = self.graph.value_dims(node)
            if not dims and not isinstance(node.meta.get("val"), torch.Tensor):
                return node.meta.get("val")
            shape = [self.graph.kept_size(t, counts) for t in dims]
            return torch.empty(shape, dtype=dtype_of(node), device="meta")

        return value


def explain(program: Program, options: PruneChannels) -> str:
    """The dependency groups of ``program`` and what ``options`` would remove from each, DepGraph-style."""
    ctx = PassContext(options.name)
    plan = plan_pruning(program, options, ctx)
    lines = [f"{program.name}: {options}"]
    if plan is not None:
        lines.append(f"{len(plan.candidates)} prunable groups:")
        for i, c in enumerate(plan.candidates):
            kept = plan.counts[c.group.space]
            roles = f" [{', '.join(sorted(c.group.roles))}]" if c.group.roles else ""
            scores = c.importance.float()
            lines.append(f"  group {i}{roles}: {c.group.size} channels, keep {kept}; importance "
                         f"min {scores.min():.3g} median {scores.median():.3g} max {scores.max():.3g}")
            lines += [f"      {m}" for m in dict.fromkeys(f"{m.role:5} {m.label}" for m in c.group.members)]
    lines += ["notes:"] + [f"  {n}" for n in ctx.notes]
    return "\n".join(lines)
