"""quantize: post-training quantization of linear and conv layers to int8, int4 and fp8 kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import PassError
from fxopt.ir.calibration import Calibration
from fxopt.ir.edit import add_constant, drop_unread_constants, erase_if_dead, inline_function, replace_node
from fxopt.ir.equivalence import input_moments
from fxopt.ir.layers import WeightedLayer, layer_matches, require_matches, weighted_layers
from fxopt.ir.meta import describe_node, has_symbolic_shapes, propagate_meta, stamp_provenance
from fxopt.ir.numerics import relative_rms_error
from fxopt.ir.observers import ObserverKind, calibrate_ranges
from fxopt.ir.program import Program
from fxopt.ir.quant import FP8, INT4, INT8, affine_params, gptq_groups, group_params, pack_int4, quantize_tensor
from fxopt.passes.base import Pass, PassContext, option

__all__ = ["Quantize", "Scheme", "Precision", "LayerSensitivity", "sensitivity", "format_sensitivity",
           "relative_rms_error"]

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt

Scheme = Literal["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "mixed"]
Precision = Literal["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "float"]
_WEIGHT_ONLY = ("w8", "w4")
_LINEAR_ONLY = ("w8a8-dynamic", "w8", "w4")
_STATIC = {"w8a8": INT8, "fp8": FP8}  # schemes with calibrated activation ranges, and their format


@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize linear and conv layers: explicit quantized ops that the backend runs as integer or fp8 kernels.

    ``scheme``: ``w8a8`` static int8 (symmetric per-output-channel weights,
    per-tensor activations over the range the ``observer`` picks on the
    calibration data); ``w8a8-dynamic`` (int8 weights, each token's scale
    computed at run time; linears); ``w8`` / ``w4`` weight-only, one scale per
    ``group-size`` inputs (linears; 4-bit weights packed two per byte);
    ``fp8`` e4m3 weights and calibrated activations (simulated in float32
    where the hardware has no fp8); ``mixed``: the first precision of ``mix``
    for most layers, the second (``float``: left alone) for the most
    sensitive ones, as few as keep the output error on the calibration data
    within ``max-error``. Weights become int8, packed int4 or fp8 tensors: the
    model is smaller as well as integer.

    Not exact: every value moves by at most half a quantization step (fp8: 2⁻⁴
    of its magnitude) within the calibrated range; the pass record shows the
    output error. Runs after the exact rewrites that change weights
    (``fold-conv-bn``, ``fuse-blocks``, ``smooth-activations``, ``awq``) and before
    ``cse``/``dce``.
    """

    name = "quantize"
    exact = False

    scheme: Scheme = option("w8a8", "number formats of weights and activations")
    observer: ObserverKind = option("minmax", "how static activation ranges are chosen from calibration data")
    percentile: float = option(99.99, "observer=percentile: the percentile of values kept in range")
    group_size: int = option(128, "w8/w4: input weights per scale (0: one scale per output channel)")
    activations: Literal["asymmetric", "symmetric"] = option("asymmetric", "w8a8: static activation zero points")
    weights: Literal["symmetric", "asymmetric"] = option("symmetric", "w8/w4: weight group zero points")
    rounding: Literal["nearest", "gptq"] = option("nearest", "w8/w4: round to nearest, or GPTQ's error-compensating "
                                                  "rounding (calibrated)")
    weight_ranges: Literal["minmax", "search"] = option("minmax", "w8/w4: each group's min/max, or the clipped range "
                                                        "with the least output error (calibrated)")
    mix: tuple[Precision, ...] = option(("w8a8", "float"), "scheme=mixed: the precision of most layers, then the "
                                        "one the most sensitive keep")
    max_error: float = option(0.05, "scheme=mixed: output error allowed on the calibration data (relative RMS, or "
                                    "the calibration's metric)")
    ignore: tuple[str, ...] = option((), "layers left in float (module path or weight name globs)")

    def __post_init__(self):
        if self.group_size < 0:
            raise ValueError(f"group-size must be 0 (per output channel) or positive, got {self.group_size}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.scheme == "mixed" and (len(self.mix) != 2 or self.mix[0] == "float" or self.mix[0] == self.mix[1]):
            raise ValueError(f"mix takes two precisions, the low one first (e.g. [w4, w8] or [w8a8, float]); "
                             f"got {list(self.mix)}")
        if self.max_error <= 0:
            raise ValueError(f"max-error must be positive, got {self.max_error}")

    def calibration_need(self) -> str | None:
        if self.scheme == "mixed":
            return "quantize{scheme=mixed}"
        if self.scheme in _STATIC:
            return f"quantize{{scheme={self.scheme}}}"
        if self.scheme in _WEIGHT_ONLY and (self.rounding == "gptq" or self.weight_ranges == "search"):
            return f"quantize{{{'rounding=gptq' if self.rounding == 'gptq' else 'weight-ranges=search'}}}"
        return None

    def apply(self, program: Program, ctx: PassContext) -> bool:
        chosen = self.candidates(program, ctx)
        if not chosen:
            return False
        plan, assignment, _ = _choose(self, program, ctx, chosen, rank=False)
        quantized = [t for t in chosen if assignment[t.node.name] != "float"]
        if not quantized:
            return False
        before = sum(program.get_constant(t.weight.target).nbytes for t in quantized)
        after = sum(t.nbytes for t in plan.rewrite(program, assignment))
        propagate_meta(program.graph_module)
        for target in quantized:
            ctx.count(f"{target.kind} layers")
        schemes = "/".join(dict.fromkeys(s for s in assignment.values() if s != "float"))
        ctx.notes.append(f"{len(quantized)} layers to {schemes}: weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
        return True

    def candidates(self, program: Program, ctx: PassContext) -> list[WeightedLayer]:
        """The layers this pass quantizes; the others are noted in ``ctx`` with the reason."""
        if has_symbolic_shapes(program.graph):
            ctx.skip("the graph", "it has dynamic (symbolic) dimensions; capture with static shapes to quantize")
            return []
        targets, refused = weighted_layers(program)
        for node, why in refused:
            ctx.skip(describe_node(node), why)
        require_matches(program, [t.node for t in targets], [("ignore", p) for p in self.ignore],
                        "`fxopt quantize --report` lists them")
        chosen = []
        schemes = self.mix if self.scheme == "mixed" else (self.scheme,)
        for target in targets:
            why = next((w for w in (self._refusal(program, target, s) for s in schemes) if w is not None), None)
            if why is not None:
                ctx.skip(describe_node(target.node), why)
            else:
                chosen.append(target)
        return chosen

    def _refusal(self, program: Program, target: WeightedLayer, scheme: str) -> str | None:
        if any(layer_matches(target.node, p) for p in self.ignore):
            return f"ignored ({target.label})"
        if target.kind == "conv" and scheme in _LINEAR_ONLY:
            return f"scheme {scheme} quantizes linear layers only"
        if scheme in _WEIGHT_ONLY:
            in_features = target.weight_value(program).shape[1]
            group = self.group_size or in_features
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


def sensitivity(program: Program, options: Quantize, calibration: Calibration,
                progress: Callable[[str], None] | None = None) -> tuple[list[LayerSensitivity], list[str]]:
    """Per-layer sensitivity (the output error on ``calibration`` with only that layer quantized, at ``options``'
    scheme, or ``mix``'s low precision), most sensitive first, and the pass's notes (layers it leaves alone,
    ``scheme=mixed``'s choice)."""
    ctx = PassContext(options.name, calibration=calibration, progress=progress)
    chosen = options.candidates(program, ctx)
    if not chosen:
        return [], ctx.notes
    _, assignment, errors = _choose(options, program, ctx, chosen, rank=True)
    ranked = sorted(chosen, key=lambda t: -errors[t.node.name])
    return [LayerSensitivity(t.label, t.kind, tuple(t.weight_value(program).shape), errors[t.node.name],
                             assignment[t.node.name]) for t in ranked], ctx.notes


def _choose(options: Quantize, program: Program, ctx: PassContext, chosen: list[WeightedLayer],
            rank: bool) -> tuple[_Plan, dict[str, str], dict[str, float]]:
    """The plan, the scheme of each layer (by node name), and, with ``rank`` or ``scheme=mixed``, each layer's
    sensitivity."""
    schemes = options.mix if options.scheme == "mixed" else (options.scheme,)
    plan = _Plan(options, program, ctx, chosen, schemes)
    errors = plan.sensitivities() if rank or options.scheme == "mixed" else {}
    if options.scheme != "mixed":
        return plan, {t.node.name: options.scheme for t in chosen}, errors
    low, high = options.mix
    assignment, error = plan.mixed(sorted(chosen, key=lambda t: -errors[t.node.name]))
    kept = sum(scheme == high for scheme in assignment.values())
    ctx.notes.append(f"mixed: the {kept} most sensitive of {len(chosen)} layers at {high}, the rest at {low}; "
                     f"output error {error:.3g} (max-error {options.max_error})")
    return plan, assignment, errors


def format_sensitivity(model: str, options: Quantize, rows: list[LayerSensitivity], notes: list[str],
                       batches: int) -> str:
    """The per-layer table of :func:`sensitivity` (``fxopt quantize --report``), with a bar per layer."""
    top = max((r.error for r in rows), default=0) or 1
    width = max((len(r.label) for r in rows), default=5)
    lines = [f"{model}: {options}",
             f"output error with one layer quantized at a time, on {batches} calibration batches, most sensitive first",
             f"{'#':>3}  {'layer':<{width}}  {'kind':<6}  {'weight':<11}  {'error':>9}  {'precision':<12}"]
    for i, row in enumerate(rows, 1):
        shape = "x".join(map(str, row.shape))
        lines.append(f"{i:>3}  {row.label:<{width}}  {row.kind:<6}  {shape:<11}  {row.error:>9.3g}  "
                     f"{row.precision:<12}  {'#' * max(1, round(24 * row.error / top))}")
    if not rows:
        lines.append("  no layer to quantize")
    return "\n".join(lines + (["notes:"] + [f"  {n}" for n in notes] if notes else []))


class _Plan:
    """Calibration statistics for quantizing ``chosen`` at ``schemes``, gathered once (keyed by node name, so a
    clone of the program can use them), quantized weights cached per layer and scheme, and the trial runs that
    measure an assignment of schemes to layers."""

    def __init__(self, options: Quantize, program: Program, ctx: PassContext, chosen: list[WeightedLayer],
                 schemes: tuple[str, ...]):
        self.options, self.program, self.ctx, self.chosen = options, program, ctx, chosen
        self.schemes = tuple(s for s in schemes if s != "float")
        self.ranges: dict[str, dict[str, tuple[float, float]]] = {}  # format name -> activation -> range
        self.hessians: dict[str, torch.Tensor] = {}
        self.weights: dict[tuple[str, str], tuple] = {}
        xs = dict.fromkeys(t.x for t in chosen)
        if any(s in _WEIGHT_ONLY for s in self.schemes) and (options.rounding == "gptq"
                                                             or options.weight_ranges == "search"):
            needs = "rounding=gptq" if options.rounding == "gptq" else "weight-ranges=search"
            calibration = ctx.require_calibration(f"quantize{{{needs}}}")
            moments = input_moments(program, calibration, xs, ctx.progress)
            self.hessians = {x.name: second for x, (second, _) in moments.items()}
        for scheme in self.schemes:
            fmt = _STATIC.get(scheme)
            if fmt is not None and fmt.name not in self.ranges:
                calibration = ctx.require_calibration(f"quantize{{scheme={scheme}}}")
                ranges = calibrate_ranges(program, calibration, xs, options.observer, fmt,
                                          symmetric=options.activations == "symmetric",
                                          percentile=options.percentile, progress=ctx.progress)
                self.ranges[fmt.name] = {x.name: r for x, r in ranges.items()}

    def rewrite(self, program: Program, assignment: dict[str, str]) -> list[torch.Tensor]:
        """Quantize ``program``'s layers (by node name) as ``assignment`` says; the quantized weights stored."""
        rewriter = _Rewriter(program, self)
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
        return self._outputs(self.program)

    def error(self, assignment: dict[str, str]) -> float:
        """The output error on the calibration data of the program quantized as ``assignment`` says."""
        trial = self.program.clone()
        self.rewrite(trial, assignment)  # no metadata needed to run it
        metric = self.calibration.metric or relative_rms_error
        value = metric(self._outputs(trial), self.reference)
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            raise PassError(f"quantize: the calibration metric must return a number (lower is better), got "
                            f"{type(value).__name__}") from None

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

    def _outputs(self, program: Program) -> list:
        with torch.no_grad():
            return [pytree.tree_unflatten(list(program.graph_module(*flat)), program.out_spec)
                    for flat in self.calibration.flat_batches(program)]


class _Rewriter:
    """Replaces layers one by one, sharing each activation's quantize node between the layers reading it."""

    def __init__(self, program: Program, plan: _Plan):
        self.program, self.plan, self.options = program, plan, plan.options
        self.graph = program.graph
        self.quantized: dict[tuple[fx.Node, str], tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.stored: list[torch.Tensor] = []
        self.replaced: dict[fx.Node, fx.Node] = {}  # a layer read by a later one is replaced first

    def constant(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        return self.graph.get_attr(add_constant(self.program, tensor.contiguous(), hint))

    def replace(self, target: WeightedLayer, scheme: str) -> None:
        dtype = target.node.meta["val"].dtype
        hint = target.weight.target.replace(".", "_")
        key = (target.weight.target, scheme)
        if key not in self.plan.weights:
            self.plan.weights[key] = self._quantize_weight(target, scheme)
        weights = self.plan.weights[key]
        self.stored.append(weights[0])
        with self.graph.inserting_before(target.node):
            bias = target.bias
            if scheme in _WEIGHT_ONLY:
                stored, scale, zero_point = weights
                x = self.replaced.get(target.x, target.x)
                new = self.graph.call_function(fxopt_ops.linear_wq.default, (
                    x, self.constant(stored, f"{hint}_q{scheme}"), self.constant(scale, f"{hint}_scale"),
                    self.constant(zero_point, f"{hint}_zero_point"), bias, 4 if scheme == "w4" else 8))
            else:
                wq, w_scale = weights
                quantized = (*self._activation(target, scheme), self.constant(wq, f"{hint}_q"),
                             self.constant(w_scale, f"{hint}_scale"), bias)
                if target.kind == "conv":
                    stride, padding, dilation, _transposed, _out_pad, groups = target.node.args[3:9]
                    new = self.graph.call_function(fxopt_ops.conv_q.default, (
                        *quantized, list(stride), list(padding), list(dilation), groups, dtype))
                else:
                    new = self.graph.call_function(fxopt_ops.linear_q.default, (*quantized, dtype))
        stamp_provenance([new], self.options.name, [target.node])
        replace_node(target.node, new)
        erase_if_dead(target.weight)
        self.replaced[target.node] = new

    def _quantize_weight(self, target: WeightedLayer, scheme: str) -> tuple[torch.Tensor, ...]:
        """``(stored, scale, zero point)`` of a weight-only scheme's groups; ``(quantized, scale)`` per output
        channel for the others."""
        weight = target.weight_value(self.program)
        if scheme not in _WEIGHT_ONLY:
            fmt = FP8 if scheme == "fp8" else INT8
            amax = weight.float().abs().amax(dim=tuple(range(1, weight.dim())))
            w_scale, _ = affine_params(-amax, amax, fmt, symmetric=True)
            return quantize_tensor(weight, w_scale.reshape(-1, *[1] * (weight.dim() - 1)), None, fmt), w_scale
        fmt = INT4 if scheme == "w4" else INT8
        group = self.options.group_size or weight.shape[1]
        symmetric = self.options.weights == "symmetric"
        hessian = self.plan.hessians.get(target.x.name)
        if self.options.rounding == "gptq":
            q, scale, zero_point = gptq_groups(weight, hessian, group, fmt, symmetric,
                                               self.options.weight_ranges == "search")
        else:
            q, scale, zero_point = group_params(weight, group, fmt, symmetric, hessian)
        return pack_int4(q) if fmt is INT4 else q, scale, zero_point

    def _activation(self, target: WeightedLayer, scheme: str) -> tuple[fx.Node, fx.Node, fx.Node]:
        """The quantized activation and its scale and zero point (shared by every layer reading ``target.x``
        at ``scheme``)."""
        original = target.x  # what calibration observed, and the key shared by its readers
        if (original, scheme) in self.quantized:
            return self.quantized[original, scheme]
        x = self.replaced.get(original, original)
        hint = f"{x.name}_act"
        if scheme == "w8a8-dynamic":
            value = original.meta["val"]  # a replacement layer has no metadata until the pass ends
            example = torch.zeros(value.shape, dtype=value.dtype)
            (scale,), created = inline_function(self.graph, _token_scale, [x], [example], target.node)
            stamp_provenance(created, self.options.name, [x])
            zero_point = self.constant(torch.zeros((), dtype=torch.int32), f"{hint}_zero_point")
            fmt = INT8
        else:
            fmt = _STATIC[scheme]
            lo, hi = self.plan.ranges[fmt.name][original.name]
            scale_value, zero_value = affine_params(torch.tensor(lo), torch.tensor(hi), fmt,
                                                    symmetric=self.options.activations == "symmetric")
            scale = self.constant(scale_value, f"{hint}_scale")
            zero_point = self.constant(zero_value, f"{hint}_zero_point")
        xq = self.graph.call_function(fxopt_ops.quantize.default, (x, scale, zero_point, fmt.name))
        stamp_provenance([xq], self.options.name, [x])
        self.quantized[original, scheme] = (xq, scale, zero_point)
        return xq, scale, zero_point


def _token_scale(x: torch.Tensor) -> tuple[torch.Tensor]:
    """Symmetric int8 scale of each token (row of the last dim), computed at run time."""
    return (x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / INT8.symmetric_max,)
