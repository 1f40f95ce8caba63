"""Latency-aware widths: snap each pruned group to the widest width that measures as fast on this machine's CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from fxopt.ir.program import Program
from fxopt.passes.base import PassContext
from fxopt.prune.dependency import ChannelGraph
from fxopt.prune.groups import Space
from fxopt.prune.rules import WEIGHT_ARGS
from fxopt.timing import time_call

if TYPE_CHECKING:
    from fxopt.prune.plan import Candidate, Cost

__all__ = ["snap_to_latency", "model_latency"]


_SNAP_STEPS = (8, 16, 32, 64)
_NOISE = 0.03  # latencies within 3% are the same: keep the wider one


def snap_to_latency(
    graph: ChannelGraph,
    candidates: list[Candidate],
    counts: dict[Space, int],
    cost: Cost,
    ctx: PassContext,
    restore: bool,
) -> tuple[dict[Space, int], set[Space]]:
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
        layers = [m.node for m in c.group.members if m.role in ("out", "in") and m.node.target in WEIGHT_ARGS]
        if kept == size or not layers or any(n in graph.group_counts for n in layers):
            continue
        widths = sorted({kept, size} | {w for s in _SNAP_STEPS if (w := -(-kept // s) * s) < size and w % c.step == 0})
        timings = {w: _time_layers(cost, layers, {**snapped, c.group.space: w}) for w in widths}
        # Without restore the unpruned width is not a choice, so it does not set the pace either: when it alone
        # measured fastest, nothing else was within the noise of it and there was no width to pick.
        allowed = {w: t for w, t in timings.items() if restore or w < size}
        fastest = min(allowed.values())
        best = max(w for w, t in allowed.items() if t <= fastest * (1 + _NOISE))
        if best != kept:
            snapped[c.group.space] = best
            if best == size:
                whole.add(c.group.space)
            else:
                widened += 1
            ctx.notes.append(
                f"latency: {c.group.describe()}: {kept} -> {best} channels "
                f"({timings[kept] * 1e6:.0f} us planned, {timings[best] * 1e6:.0f} us chosen, "
                f"{timings[size] * 1e6:.0f} us unpruned)"
            )
    ctx.count("groups-widened-for-latency", widened)
    ctx.count("groups-kept-whole-for-latency", len(whole))
    return snapped, whole


def model_latency(program: Program) -> float:
    with torch.no_grad():
        return time_call(program.graph_module, tuple(program.example_inputs))


def _time_layers(cost: Cost, layers: list[fx.Node], counts: dict[Space, int]) -> float:
    """Median seconds of running ``layers`` at the shapes ``counts`` gives them, on random inputs."""
    shaped = cost.shaped(counts)

    def materialize(arg: object) -> object:
        if isinstance(arg, fx.Node):
            meta = shaped(arg)
            return torch.randn(meta.shape, dtype=meta.dtype) if isinstance(meta, torch.Tensor) else meta
        return arg

    calls = [
        (n.target, tuple(materialize(a) for a in n.args), {k: materialize(v) for k, v in n.kwargs.items()})
        for n in layers
    ]

    def run() -> None:
        for op, args, kwargs in calls:
            op(*args, **kwargs)

    with torch.no_grad():
        return time_call(run)
