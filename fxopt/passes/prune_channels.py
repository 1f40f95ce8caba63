"""Structured pruning: remove whole channels, neurons and attention heads, leaving a smaller dense model."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.analysis import node_flops
from fxopt.ir.calibration import Calibration, data_nodes, gradients, observe
from fxopt.ir.channels import ChannelGraph, Group, Leaf, Prod, Space, Tree, analyze, shrink
from fxopt.ir.layers import BATCH_NORM, as_affine, layer_matches, require_matches
from fxopt.ir.meta import describe_node, dtype_of, has_symbolic_shapes, module_name, shape_of
from fxopt.ir.numerics import relative_rms_error
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.timing import time_call

__all__ = ["PruneChannels", "PrunePlan", "plan_pruning"]

Importance = Literal["l1", "l2", "bn-scale", "taylor", "activation", "random"]

aten = torch.ops.aten


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
    ``taylor`` the first-order estimate ``|w * dL/dw|`` of the loss change
    when a channel's weights are removed, summed over the calibration batches
    (the loss is the calibration's, else the outputs' squared norm),
    ``activation`` (CFSP-style, calibration data) a channel's L1 weight
    score times the norm of what its consumers read from it, and under
    ``scope=global`` each group is also weighted by how far its residual
    block turns the stream (angular distance of block input and output),
    so blocks that change little lose more; ``random`` a seeded baseline. Attention heads are removed whole
    (``heads``; head_dim kept) and head_dim only with ``head-dim=true``.

    Lossy: outputs change by the removed channels' contribution (the report
    gives the error against the unpruned model); channels whose weights are
    all exactly zero are removed first and without changing any output.
    Run on the captured graph before ``fold-conv-bn`` (``bn-scale`` needs the
    BatchNorms) and ``fuse-blocks``.
    """

    name = "prune-channels"
    exact = False
    before = ("fold-conv-bn", "fuse-blocks", "quantize")
    ratio: float = option(0.3, "fraction of the target removed, in [0, 1)")
    target: Literal["flops", "params", "channels"] = option("flops", "what the ratio is a fraction of")
    importance: Importance = option("l1", "how channels are ranked")
    scope: Literal["uniform", "global", "per-layer-ratios"] = option(
        "uniform", "same ratio per group, one ranking across groups, or the channel ratios of layer-ratios")
    round_to: int = option(1, "kept channels per group are a multiple of this (heads excepted)")
    min_channels: int = option(1, "fewest channels (or heads) a group keeps")
    heads: bool = option(True, "remove whole attention heads")
    head_dim: bool = option(False, "shrink every head's dimension")
    ignore: tuple[str, ...] = option((), "layers whose output channels stay (module path or weight name globs)")
    layer_ratios: tuple[str, ...] = option(
        (), "scope=per-layer-ratios: 'glob:ratio' channel fractions by layer, first match wins, else ratio")
    compensate: bool = option(False, "fold a data-free reconstruction of removed channels into the next layers")
    latency: bool = option(False, "snap each group's width to what measures fastest on this machine's CPU")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError("round-to and min-channels must be at least 1")
        if bool(self.layer_ratios) != (self.scope == "per-layer-ratios"):
            raise ValueError("scope=per-layer-ratios and layer-ratios=[glob:ratio, ...] go together")
        for entry in self.layer_ratios:
            pattern, _, value = entry.rpartition(":")
            try:
                ok = bool(pattern) and 0 <= float(value) < 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"layer-ratios entry {entry!r} must be 'glob:ratio' with ratio in [0, 1)")

    def calibration_need(self) -> str | None:
        return f"importance={self.importance}" if self.importance in ("taylor", "activation") else None

    def apply(self, program: Program, ctx: PassContext) -> bool:
        if self.ratio == 0 and not self.layer_ratios:
            return False
        plan = plan_pruning(program, self, ctx)
        if plan is None or not plan.removed:
            return False
        before = _model_latency(program) if self.latency else 0.0
        if self.compensate:
            _shrink_compensated(plan, ctx)
        else:
            shrink(plan.graph, plan.keep())
        ctx.count("channels-removed", plan.removed)
        ctx.count("groups-pruned", sum(1 for c in plan.candidates if plan.counts[c.group.space] < c.group.size))
        if self.latency:
            after = _model_latency(program)
            ctx.notes.append(f"latency: the whole model measured {before * 1e3:.3g} ms -> {after * 1e3:.3g} ms "
                             f"({before / after:.2f}x) in PyTorch on this CPU, example inputs")
        return True


@dataclass
class _Candidate:
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
            ctx.skip(_label(group), why)
    candidates = []
    excluded_by = {g.space: _excluded(g, options) for g in groups}
    scores = _Scores(graph, [g for g in groups if not excluded_by[g.space]], options.importance, ctx)
    for group in groups:
        excluded = excluded_by[group.space]
        importance = None if excluded else scores(group, len(candidates))
        if excluded or importance is None:
            ctx.skip(_label(group), excluded or "no normalization scale in the group")
            continue
        step = 1 if "heads" in group.roles else options.round_to
        candidates.append(_Candidate(group, importance, min(options.min_channels, group.size), step,
                                     scores.weight(group)))
    ctx.count("groups", len(candidates))
    cost = _Cost(graph, options.target, candidates)
    full = cost({})
    counts = _solve(candidates, options, cost, full, ctx)
    if options.latency:
        counts, whole = _snap_to_latency(graph, candidates, counts, cost, ctx, restore=True)
        if whole:  # meet the target in the groups where pruning pays instead
            rest = [c for c in candidates if c.group.space not in whole]
            counts = {**{space: space.size for space in whole}, **_solve(rest, options, cost, full, ctx)}
            counts, _ = _snap_to_latency(graph, rest, counts, cost, ctx, restore=False)
    plan = PrunePlan(graph, candidates, counts)
    asked = "per-layer ratios" if options.layer_ratios else f"asked {options.ratio:.1%}"
    ctx.notes.append(f"{options.target} reduced by {1 - cost(counts) / full:.1%} ({asked})"
                     if full > 0 else "nothing to prune")
    for c in candidates:
        kept = counts[c.group.space]
        if kept < c.group.size:
            ctx.notes.append(f"{c.group.size} -> {kept} channels: {c.group.describe()}")
    return plan


def _solve(candidates: list[_Candidate], options: PruneChannels, cost: _Cost, full: float,
           ctx: PassContext) -> dict[Space, int]:
    """The kept count of each candidate at the smallest pruning level that brings ``cost`` within the budget.

    ``scope=per-layer-ratios`` has no budget: each group loses the channel
    fraction given for its layers.
    """
    if options.scope == "per-layer-ratios":
        return {c.group.space: c.group.size - c.removable(math.floor(_group_ratio(c.group, options) * c.group.size))
                for c in candidates}
    wanted = _schedule(candidates, options.scope)
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
        ctx.notes.append(f"only {1 - most / full if full > 0 else 0.0:.1%} of the {options.target} can be "
                         f"removed (asked {options.ratio:.1%}): the rest is pinned or at min-channels")
    return wanted(level)


def _layer_ratios(options: PruneChannels) -> list[tuple[str, float]]:
    return [(pattern, float(value)) for pattern, _, value in (e.rpartition(":") for e in options.layer_ratios)]


def _group_ratio(group: Group, options: PruneChannels) -> float:
    """The channel fraction of the first layer-ratios pattern matching one of the group's layers, else ``ratio``."""
    layers = [m.node for m in group.members if m.role == "out"]
    return next((r for p, r in _layer_ratios(options) if any(layer_matches(n, p) for n in layers)), options.ratio)


def _excluded(group: Group, options: PruneChannels) -> str | None:
    if "heads" in group.roles and not options.heads:
        return "attention heads (heads=false)"
    if "head-dim" in group.roles and not options.head_dim:
        return "attention head dimension (head-dim=false)"
    for member in group.members:
        if member.role == "out" and any(layer_matches(member.node, p) for p in options.ignore):
            return f"its output layer is ignored ({module_name(member.node) or member.node.name})"
    return None


def _label(group: Group) -> str:
    return f"group of {group.size} ({group.describe()})"


class _Scores:
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
        weights = self._per_channel(group, lambda t: self.graph.program.get_constant(t).dim() >= 2,
                                    2 if self.kind == "l2" else 1)
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

    def _per_channel(self, group: Group, use: Callable[[str], bool], power: int,
                     tensor: Callable[[str], torch.Tensor] | None = None) -> torch.Tensor | None:
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

    def _watch_block(self, space: Space, readers: list[fx.Node], data: set[fx.Node],
                     watch: dict[fx.Node, list[Callable[[torch.Tensor], None]]]) -> None:
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


def _schedule(candidates: list[_Candidate], scope: str) -> Callable[[float], dict[Space, int]]:
    """``wanted(x)``: the kept count of every group at pruning level ``x`` in [0, 1] (monotone in ``x``)."""
    if scope == "uniform":
        return lambda x: {c.group.space: c.group.size - c.removable(math.floor(x * c.group.size + 1e-9))
                          for c in candidates}
    normalized = []
    for c in candidates:
        mean = c.importance.mean()
        normalized.append(c.importance * (c.weight / mean) if mean > 0 else torch.zeros_like(c.importance))
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
            return float(sum(counts.get(c.group.space, c.group.size) for c in self.candidates))
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


# ----------------------------------------------------------------------------- latency-aware widths

_SNAP_STEPS = (8, 16, 32, 64)
_NOISE = 0.03  # latencies within 3% are the same: keep the wider one


def _snap_to_latency(graph: ChannelGraph, candidates: list[_Candidate], counts: dict[Space, int], cost: _Cost,
                     ctx: PassContext, restore: bool) -> tuple[dict[Space, int], set[Space]]:
    """Widen each pruned group to the widest width that measures as fast as its planned one.

    A group's layers are timed in PyTorch on this machine's CPU (random
    inputs of the pruned shapes) at the planned width, at that width rounded
    up to multiples of 8 to 64, and unpruned. Kernels run in steps (vector
    widths, tiles), so keeping a few more channels is often free, and
    pruning a little can be slower than not pruning: with ``restore``, a
    group whose pruned layers are no faster than its unpruned ones keeps
    every channel (returned, so the caller can prune elsewhere instead).
    """
    snapped = dict(counts)
    whole: set[Space] = set()
    widened = 0
    for c in candidates:
        kept, size = counts[c.group.space], c.group.size
        layers = [m.node for m in c.group.members if m.role in ("out", "in") and m.node.target in _WEIGHT_ARGS]
        if kept == size or not layers or any(n in graph.group_counts for n in layers):
            continue
        widths = sorted({kept, size} | {w for s in _SNAP_STEPS if (w := -(-kept // s) * s) < size and w % c.step == 0})
        timings = {w: _time_layers(cost, layers, {**snapped, c.group.space: w}) for w in widths}
        fastest = min(timings.values())
        best = max(w for w, t in timings.items() if t <= fastest * (1 + _NOISE) and (restore or w < size))
        if best != kept:
            snapped[c.group.space] = best
            if best == size:
                whole.add(c.group.space)
            else:
                widened += 1
            ctx.notes.append(f"latency: {c.group.describe()}: {kept} -> {best} channels "
                             f"({timings[kept] * 1e6:.0f} us planned, {timings[best] * 1e6:.0f} us chosen, "
                             f"{timings[size] * 1e6:.0f} us unpruned)")
    ctx.count("groups-widened-for-latency", widened)
    ctx.count("groups-kept-whole-for-latency", len(whole))
    return snapped, whole


def _model_latency(program: Program) -> float:
    with torch.no_grad():
        return time_call(program.graph_module, tuple(program.example_inputs))


def _time_layers(cost: _Cost, layers: list[fx.Node], counts: dict[Space, int]) -> float:
    """Median seconds of running ``layers`` at the shapes ``counts`` gives them, on random inputs."""
    shaped = cost._shaped(counts)

    def materialize(arg: object) -> object:
        if isinstance(arg, fx.Node):
            meta = shaped(arg)
            return torch.randn(meta.shape, dtype=meta.dtype) if isinstance(meta, torch.Tensor) else meta
        return arg

    calls = [(n.target, tuple(materialize(a) for a in n.args), {k: materialize(v) for k, v in n.kwargs.items()})
             for n in layers]

    def run() -> None:
        for op, args, kwargs in calls:
            op(*args, **kwargs)

    with torch.no_grad():
        return time_call(run)


# ----------------------------------------------------------------------------- data-free compensation

# Ops that carry each channel through linearly: a removed channel rebuilt from kept ones stays rebuilt.
_LINEAR = {aten.add.Tensor, aten.sub.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
           aten.squeeze.dims, aten.expand.default, aten.clone.default, aten.alias.default, aten._to_copy.default,
           aten.contiguous.default, aten.mean.dim, aten.sum.dim_IntList, aten.avg_pool2d.default,
           aten._adaptive_avg_pool2d.default, aten.dropout.default, operator.getitem}
# Per-channel ops with f(s * x) = s * f(x) for s > 0 (exactly, or nearly for the smooth ones): a removed channel
# can be rebuilt from one kept channel, scaled, but not from a mix of them.
_HOMOGENEOUS = {aten.relu.default, aten.leaky_relu.default, aten.max_pool2d_with_indices.default,
                aten.gelu.default, aten.silu.default, aten.hardswish.default}
# Where the weight (and bias) of a layer are among its arguments.
_WEIGHT_ARGS = {aten.linear.default: (1, 2), aten.convolution.default: (1, 2), aten.addmm.default: (2, 0)}


def _shrink_compensated(plan: PrunePlan, ctx: PassContext) -> None:
    """Shrink with compensation (UDFC-style, data-free), keeping it only where it lowers the output error.

    For each pruned group, each removed channel's response (the producing
    layers' weights and bias, through a batch norm's affine) is approximated
    from the kept channels' responses, and the layers reading the channels
    get that combination added to the kept channels' weights: closed-form
    least squares where only linear ops lie between, the single most similar
    kept channel, positively scaled, across ReLU-like activations. The error
    removed is measured on the example inputs against plain removal.
    """
    program = plan.graph.program
    reference = program.run_flat()
    keep = plan.keep()
    values: dict[str, torch.Tensor] = {}
    compensated = 0
    for candidate in plan.candidates:
        if candidate.group.space not in keep:
            continue
        why = _compensate(plan.graph, candidate.group, keep[candidate.group.space], values)
        if why:
            ctx.skip(f"compensating {_label(candidate.group)}", why)
        else:
            compensated += 1
    if not compensated:
        shrink(plan.graph, keep)
        return
    plain = program.clone()
    plain_graph = analyze(plain)
    shrink(plain_graph, {_same_axis(plan.graph, plain_graph, space): kept for space, kept in keep.items()})
    shrink(plan.graph, keep, values)
    error = relative_rms_error(program.run_flat(), reference)
    plain_error = relative_rms_error(plain.run_flat(), reference)
    if error > plain_error:
        program.graph_module = plain.graph_module
        ctx.notes.append(f"compensation left out: it raised the relative output error on the example inputs "
                         f"({plain_error:.4g} -> {error:.4g})")
        return
    ctx.count("groups-compensated", compensated)
    removed = 1 - error / plain_error if plain_error > 0 else 0.0
    ctx.notes.append(f"compensation: relative output error on the example inputs {plain_error:.4g} -> {error:.4g} "
                     f"({removed:.0%} of it removed), {compensated} groups compensated")


def _same_axis(graph: ChannelGraph, other: ChannelGraph, space: Space) -> Space:
    """``space`` of ``graph`` in ``other``, the analysis of a clone of its program (same constants, same walk)."""
    target, dim = next((t, d) for t, trees in graph.constant_dims().items() for d, tree in enumerate(trees)
                       if space in set(graph.leaves(tree)))
    index = list(graph.leaves(graph.constant_dims()[target][dim])).index(space)
    return list(other.leaves(other.constant_dims()[target][dim]))[index]


def _compensate(graph: ChannelGraph, group: Group, kept: torch.Tensor, values: dict[str, torch.Tensor]) -> str | None:
    """Add to ``values`` the consumer weights that make up for the group's removed channels; else say why not."""
    if group.roles:
        return "attention mixes heads through a softmax"
    program = graph.program
    producers = {m.node for m in group.members if m.role == "out"}
    consumers = {m.node: m.dim for m in group.members if m.role == "in"}
    touching = [n for n in program.graph.nodes if n.op == "call_function"
                and any(group.space in set(graph.leaves(t)) for t in _all_dims(graph, n))]
    carried = set(touching)
    affine: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}  # producer -> (scale, shift) of its batch norm
    homogeneous = False
    for node in touching:
        if node in graph.group_counts:
            return f"grouped convolution {module_name(node) or node.name} treats each channel by its own kernel"
        for user in node.users:
            if user not in carried and user not in consumers:
                return f"{describe_node(user)} reads the channels and has no weights to adjust"
        if node in producers:
            if _weight(node) is None:
                return f"{describe_node(node)} has no plain weight"
        elif node.target is BATCH_NORM:
            norm = next((as_affine(program, u) for u in node.users if u.args[1] == 0), None)
            if norm is None or norm.x not in producers or norm.x in affine:
                return "a batch norm that does not directly follow a layer"
            device = program.get_constant(_weight(norm.x).target).device
            scale, shift = norm.evaluate(program, shape_of(norm.x)[1], device)
            affine[norm.x] = (scale.double().cpu(), shift.double().cpu())
        elif node.target in _HOMOGENEOUS:
            homogeneous = True
        elif not (node.target in _LINEAR or (node.target is aten.mul.Tensor and not isinstance(node.args[1], fx.Node))):
            return f"{describe_node(node)} is not linear in the channels"
    for node in consumers:
        weight = _weight(node)
        if weight is None or any(u not in consumers for u in weight.users):
            return f"{describe_node(node)} reads the channels without a weight of its own"
        tree = graph.resolve(graph.value_dims(weight)[consumers[node]])
        if tree != Leaf(group.space) and not (isinstance(tree, Prod) and tree.factors[0] == Leaf(group.space)):
            return f"{describe_node(node)} reads the channels interleaved with other dimensions"
    responses = [_responses(graph, group, p, values, affine.get(p)) for p in producers]
    if not producers or any(r is None for r in responses):
        return "a layer's channels are spread over a reshaped dimension"
    features = torch.cat(responses, 1)
    removed = torch.ones(group.size, dtype=torch.bool)
    removed[kept] = False
    mix = _reconstruction(features[removed], features[kept], homogeneous)
    for node, dim in consumers.items():
        target = _weight(node).target
        weight = values.get(target, program.get_constant(target)).detach()
        # Channels first along the dim (a flatten of C x H x W reads each channel at H*W positions).
        moved = weight.movedim(dim, -1).double()
        moved = moved.reshape(*moved.shape[:-1], group.size, -1).transpose(-1, -2)
        adjusted = moved.clone()
        adjusted[..., kept] += moved[..., removed] @ mix
        adjusted = adjusted.transpose(-1, -2).reshape(*weight.movedim(dim, -1).shape)
        values[target] = adjusted.to(weight.dtype).movedim(-1, dim).contiguous()
    return None


def _weight(layer: fx.Node) -> fx.Node | None:
    """The ``get_attr`` of a linear, conv or addmm's weight, if it reads one directly."""
    arg = layer.args[_WEIGHT_ARGS[layer.target][0]] if layer.target in _WEIGHT_ARGS else None
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _all_dims(graph: ChannelGraph, node: fx.Node) -> list[Tree]:
    dims = graph.dims.get(node)
    if isinstance(dims, tuple):
        return [t for d in dims for t in d]
    return list(dims or [])


def _responses(graph: ChannelGraph, group: Group, producer: fx.Node, values: dict[str, torch.Tensor],
               affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """One row per channel: what the producer computes for it (weights, then bias), through the batch norm."""
    program = graph.program
    weight, bias_arg = _weight(producer), _WEIGHT_ARGS[producer.target][1]
    dim = next(m.dim for m in group.members if m.node is producer and m.role == "out")
    tree = graph.resolve(graph.value_dims(weight)[dim])
    if tree != Leaf(group.space):
        return None
    w = values.get(weight.target, program.get_constant(weight.target))
    rows = w.detach().double().movedim(dim, 0).reshape(group.size, -1)
    bias = producer.args[bias_arg] if bias_arg is not None and len(producer.args) > bias_arg else None
    b = (program.get_constant(bias.target).detach().double() if isinstance(bias, fx.Node) and bias.op == "get_attr"
         else torch.zeros(group.size, dtype=torch.float64))
    if affine is not None:
        scale, shift = affine
        rows, b = rows * scale[:, None], b * scale + shift
    return torch.cat([rows, b[:, None]], 1)


def _reconstruction(removed: torch.Tensor, kept: torch.Tensor, single: bool) -> torch.Tensor:
    """``mix`` (removed x kept) with ``removed ~ mix @ kept``: ridge least squares, or one positive scale per row."""
    if single:
        similarity = torch.nn.functional.normalize(removed, dim=1) @ torch.nn.functional.normalize(kept, dim=1).T
        best = similarity.argmax(1)
        scale = (removed * kept[best]).sum(1) / kept[best].pow(2).sum(1).clamp_min(1e-30)
        mix = torch.zeros(len(removed), len(kept), dtype=torch.float64)
        mix[torch.arange(len(removed)), best] = scale.clamp_min(0)
        return mix
    # Least squares by SVD, not the normal equations: those square the condition number, and their ridge then
    # biased an exact reconstruction by 0.3% when the kept channels' condition number was 1.5e3.
    return torch.linalg.lstsq(kept.T, removed.T, rcond=1e-12, driver="gelsd").solution.T


def explain(program: Program, options: PruneChannels, calibration: Calibration | None = None) -> str:
    """The dependency groups of ``program`` and what ``options`` would remove from each, DepGraph-style."""
    ctx = PassContext(options.name, calibration=calibration)
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
