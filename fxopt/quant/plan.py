"""Choosing how each layer is quantized: the candidate layers, their calibration statistics (activation ranges,
input Hessians), per-layer sensitivity and ``scheme=mixed``'s search, measured by trial runs of quantized copies."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fxopt.calibration import Calibration, model_outputs, output_error
from fxopt.ir.edit import drop_unread_constants
from fxopt.ir.layers import WeightedLayer, layer_matches, require_matches, weighted_layers
from fxopt.ir.meta import describe_node, has_symbolic_shapes
from fxopt.ir.program import Program
from fxopt.passes.base import PassContext
from fxopt.quant.equivalence import input_moments
from fxopt.quant.observers import calibrate_ranges
from fxopt.quant.rewrite import LINEAR_ONLY, STATIC, WEIGHT_ONLY, Rewriter
from fxopt.tables import format_table

if TYPE_CHECKING:
    from fxopt.passes.quantize import Quantize

__all__ = ["candidates", "choose", "QuantPlan", "LayerSensitivity", "sensitivity", "format_sensitivity"]


def candidates(program: Program, options: Quantize, ctx: PassContext) -> list[WeightedLayer]:
    """The layers ``options`` quantize; the others are noted in ``ctx`` with the reason."""
    if has_symbolic_shapes(program.graph):
        ctx.skip("the graph", "it has dynamic (symbolic) dimensions; capture with static shapes to quantize")
        return []
    targets, refused = weighted_layers(program)
    for node, why in refused:
        ctx.skip(describe_node(node), why)
    require_matches(
        program,
        [t.node for t in targets],
        [("ignore", p) for p in options.ignore],
        "`fxopt quantize --report` lists them",
    )
    chosen = []
    schemes = options.mix if options.scheme == "mixed" else (options.scheme,)
    for target in targets:
        why = next((w for w in (_refusal(program, options, target, s) for s in schemes) if w is not None), None)
        if why is not None:
            ctx.skip(describe_node(target.node), why)
        else:
            chosen.append(target)
    return chosen


def _refusal(program: Program, options: Quantize, target: WeightedLayer, scheme: str) -> str | None:
    if any(layer_matches(target.node, p) for p in options.ignore):
        return f"ignored ({target.label})"
    if target.kind == "conv" and scheme in LINEAR_ONLY:
        return f"scheme {scheme} quantizes linear layers only"
    if scheme in WEIGHT_ONLY:
        in_features = target.weight_value(program).shape[1]
        group = options.group_size or in_features
        if in_features % group:
            return f"its {in_features} inputs are not a multiple of group-size {group}"
        if scheme == "w4" and in_features % 2:
            return f"its {in_features} inputs are odd; 4-bit weights pack two per byte"
    return None


@dataclass(frozen=True)
class LayerSensitivity:
    """How much the model's output moves when only one layer is quantized."""

    label: str
    kind: str
    shape: tuple[int, ...]
    error: float
    precision: str  # what scheme=mixed gives it (the scheme itself otherwise)


def sensitivity(
    program: Program, options: Quantize, calibration: Calibration, progress: Callable[[str], None] | None = None
) -> tuple[list[LayerSensitivity], list[str]]:
    """Per-layer sensitivity (the output error on ``calibration`` with only that layer quantized, at ``options``'
    scheme, or ``mix``'s low precision), most sensitive first, and the pass's notes (layers it leaves alone,
    ``scheme=mixed``'s choice)."""
    ctx = PassContext(options.name, calibration=calibration, progress=progress)
    chosen = candidates(program, options, ctx)
    if not chosen:
        return [], ctx.notes
    _, assignment, errors = choose(options, program, ctx, chosen, rank=True)
    ranked = sorted(chosen, key=lambda t: -errors[t.node.name])
    return [
        LayerSensitivity(
            t.label, t.kind, tuple(t.weight_value(program).shape), errors[t.node.name], assignment[t.node.name]
        )
        for t in ranked
    ], ctx.notes


def choose(
    options: Quantize, program: Program, ctx: PassContext, chosen: list[WeightedLayer], rank: bool
) -> tuple[QuantPlan, dict[str, str], dict[str, float]]:
    """The plan, the scheme of each layer (by node name), and, with ``rank`` or ``scheme=mixed``, each layer's
    sensitivity."""
    schemes = options.mix if options.scheme == "mixed" else (options.scheme,)
    plan = QuantPlan(options, program, ctx, chosen, schemes)
    errors = plan.sensitivities() if rank or options.scheme == "mixed" else {}
    if options.scheme != "mixed":
        return plan, {t.node.name: options.scheme for t in chosen}, errors
    low, high = options.mix
    assignment, error = plan.mixed(sorted(chosen, key=lambda t: -errors[t.node.name]))
    kept = sum(scheme == high for scheme in assignment.values())
    ctx.notes.append(
        f"mixed: the {kept} most sensitive of {len(chosen)} layers at {high}, the rest at {low}; "
        f"output error {error:.3g} (max-error {options.max_error})"
    )
    return plan, assignment, errors


def format_sensitivity(
    model: str, options: Quantize, rows: list[LayerSensitivity], notes: list[str], batches: int
) -> str:
    """The per-layer table of :func:`sensitivity` (``fxopt quantize --report``), with a bar per layer."""
    top = max((r.error for r in rows), default=0) or 1
    lines = [
        f"{model}: {options}",
        f"output error with one layer quantized at a time, on {batches} calibration batches, most sensitive first",
    ]
    if rows:
        table = [
            [
                i,
                row.label,
                row.kind,
                "x".join(map(str, row.shape)),
                f"{row.error:.3g}",
                row.precision,
                "#" * max(1, round(24 * row.error / top)),
            ]
            for i, row in enumerate(rows, 1)
        ]
        lines += format_table(["#", "layer", "kind", "weight", "error", "precision", ""], table, right=["#", "error"])
    else:
        lines.append("  no layer to quantize")
    return "\n".join(lines + (["notes:"] + [f"  {n}" for n in notes] if notes else []))


class QuantPlan:
    """Calibration statistics for quantizing ``chosen`` at ``schemes``, gathered once (keyed by node name, so a
    clone of the program can use them), quantized weights cached per layer and scheme, and the trial runs that
    measure an assignment of schemes to layers."""

    def __init__(
        self,
        options: Quantize,
        program: Program,
        ctx: PassContext,
        chosen: list[WeightedLayer],
        schemes: tuple[str, ...],
    ):
        self.options, self.program, self.ctx, self.chosen = options, program, ctx, chosen
        self.schemes = tuple(s for s in schemes if s != "float")
        self.ranges: dict[str, dict[str, tuple[float, float]]] = {}  # format name -> activation -> range
        self.hessians: dict[str, torch.Tensor] = {}
        self.weights: dict[tuple[str, str], tuple] = {}
        xs = dict.fromkeys(t.x for t in chosen)
        if any(s in WEIGHT_ONLY for s in self.schemes) and (
            options.rounding == "gptq" or options.weight_ranges == "search"
        ):
            needs = "rounding=gptq" if options.rounding == "gptq" else "weight-ranges=search"
            calibration = ctx.require_calibration(f"quantize{{{needs}}}")
            moments = input_moments(program, calibration, xs, ctx.progress)
            self.hessians = {x.name: second for x, (second, _) in moments.items()}
        for scheme in self.schemes:
            fmt = STATIC.get(scheme)
            if fmt is not None and fmt.name not in self.ranges:
                calibration = ctx.require_calibration(f"quantize{{scheme={scheme}}}")
                ranges = calibrate_ranges(
                    program,
                    calibration,
                    xs,
                    options.observer,
                    fmt,
                    symmetric=options.activations == "symmetric",
                    percentile=options.percentile,
                    progress=ctx.progress,
                )
                self.ranges[fmt.name] = {x.name: r for x, r in ranges.items()}

    def rewrite(self, program: Program, assignment: dict[str, str]) -> list[torch.Tensor]:
        """Quantize ``program``'s layers (by node name) as ``assignment`` says; the quantized weights stored."""
        rewriter = Rewriter(program, self)
        for target in weighted_layers(program)[0]:
            scheme = assignment.get(target.node.name, "float")
            if scheme != "float":
                rewriter.replace(target, scheme)
        drop_unread_constants(program)
        program.graph_module.recompile()
        return rewriter.stored

    @functools.cached_property
    def calibration(self) -> Calibration:
        return self.ctx.require_calibration("quantize sensitivity (scheme=mixed, --report)")

    @functools.cached_property
    def reference(self) -> list:
        """The float program's outputs on the calibration batches."""
        return model_outputs(self.program, self.calibration)

    def error(self, assignment: dict[str, str]) -> float:
        """The output error on the calibration data of the program quantized as ``assignment`` says."""
        trial = self.program.clone()
        self.rewrite(trial, assignment)  # no metadata needed to run it
        return output_error(self.calibration, model_outputs(trial, self.calibration), self.reference, "quantize")

    def sensitivities(self) -> dict[str, float]:
        """Each chosen layer's output error quantized alone at the first scheme."""
        errors = {}
        for done, target in enumerate(self.chosen, 1):
            errors[target.node.name] = self.error({target.node.name: self.schemes[0]})
            if self.ctx.progress:
                self.ctx.progress(f"sensitivity: layer {done}/{len(self.chosen)}")
        return errors

    def mixed(self, ranked: list[WeightedLayer]) -> tuple[dict[str, str], float]:
        """The fewest most-sensitive layers of ``ranked`` at the high precision that meet ``max-error``, and the
        output error then.

        Bisection on their number: adding high-precision layers is taken to never raise the error (it holds
        in the mean; the error returned is measured)."""
        low, high = self.options.mix
        bound = self.options.max_error
        errors: dict[int, float] = {}

        def assignment(count: int) -> dict[str, str]:
            return {t.node.name: high if i < count else low for i, t in enumerate(ranked)}

        def error(count: int) -> float:
            if count not in errors:
                errors[count] = self.error(assignment(count))
            return errors[count]

        lo, hi = 0, len(ranked)  # the answer is in [lo, hi]
        if error(hi) > bound:
            self.ctx.notes.append(f"mixed: max-error {bound} is not met even with every layer at {high}")
            return assignment(hi), error(hi)
        while lo < hi:
            middle = (lo + hi) // 2
            if error(middle) <= bound:
                hi = middle
            else:
                lo = middle + 1
            if self.ctx.progress:
                self.ctx.progress(f"mixed precision search: between {lo} and {hi} layers at {high}")
        return assignment(lo), error(lo)
