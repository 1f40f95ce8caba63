"""prune-channels: structured pruning — remove whole channels, neurons and attention heads, leaving a smaller dense
model.

The pass holds the options; :mod:`fxopt.prune` does the work (dependency groups, importance, the plan, latency,
compensation, the shrink rewrite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.prune.compensation import shrink_compensated
from fxopt.prune.importance import Importance
from fxopt.prune.latency import model_latency
from fxopt.prune.plan import plan_pruning
from fxopt.prune.reconstruction import layers_to_refit, reconstruct
from fxopt.prune.shrink import shrink

__all__ = ["PruneChannels"]


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important channels, neurons and attention heads; the result is an ordinary dense model.

    Channel groups come from :mod:`fxopt.prune.dependency`: every dimension that
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
    so blocks that change little lose more; ``fisher`` (Kwon et al. 2022, calibration data) the Fisher
    information of a mask on each channel, compared across groups as it is (``scope=global``), per unit of
    the target a channel saves, in a greedy order that counts what removing units of one group together
    costs; ``random`` a seeded baseline. Attention heads are removed whole
    (``heads``; head_dim kept) and head_dim only with ``head-dim=true``.

    ``reconstruct=true`` (calibration data) then re-fits each linear or conv reading pruned channels, layer
    after layer, so its output matches the unpruned one's on the calibration data (least squares, damped,
    chosen and checked on held-out batches; see :mod:`fxopt.prune.reconstruction`); each layer's error
    before and after is in the notes.

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
        "uniform", "same ratio per group, one ranking across groups, or the channel ratios of layer-ratios"
    )
    round_to: int = option(1, "kept channels per group are a multiple of this (heads excepted)")
    min_channels: int = option(1, "fewest channels (or heads) a group keeps")
    heads: bool = option(True, "remove whole attention heads")
    head_dim: bool = option(False, "shrink every head's dimension")
    ignore: tuple[str, ...] = option((), "layers whose output channels stay (module path or weight name globs)")
    layer_ratios: tuple[str, ...] = option(
        (), "scope=per-layer-ratios: 'glob:ratio' channel fractions by layer, first match wins, else ratio"
    )
    compensate: bool = option(False, "fold a data-free reconstruction of removed channels into the next layers")
    latency: bool = option(False, "snap each group's width to what measures fastest on this machine's CPU")
    reconstruct: bool = option(
        False, "re-fit the layers reading pruned channels to the unpruned outputs on calibration data"
    )

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
        if self.importance in ("taylor", "activation", "fisher"):
            return f"importance={self.importance}"
        return "reconstruct=true" if self.reconstruct else None

    def apply(self, program: Program, ctx: PassContext) -> bool:
        if self.ratio == 0 and not self.layer_ratios:
            return False
        plan = plan_pruning(program, self, ctx)
        if plan is None or not plan.removed:
            return False
        before = model_latency(program) if self.latency else 0.0
        calibration = ctx.require_calibration("reconstruct=true") if self.reconstruct else None
        refit = layers_to_refit(plan, ctx) if calibration else {}
        original = program.clone() if refit else program  # the graph before removal (constants are shared)
        if self.compensate:
            shrink_compensated(plan, ctx)
        else:
            shrink(plan.graph, plan.keep())
        if calibration and refit:
            fits = reconstruct(program, original, refit, calibration, ctx)
            ctx.notes.extend(fit.note() for fit in fits)
            ctx.count("layers-reconstructed", sum(f.applied for f in fits))
        ctx.count("channels-removed", plan.removed)
        ctx.count("groups-pruned", sum(1 for c in plan.candidates if plan.counts[c.group.space] < c.group.size))
        if self.latency:
            after = model_latency(program)
            ctx.notes.append(
                f"latency: the whole model measured {before * 1e3:.3g} ms -> {after * 1e3:.3g} ms "
                f"({before / after:.2f}x) in PyTorch on this CPU, example inputs"
            )
        return True
