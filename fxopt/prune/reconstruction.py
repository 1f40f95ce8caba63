"""Reconstruction after pruning: re-fit each layer that lost input channels so that, on calibration data, its
output matches the unpruned layer's (Kwon et al. 2022's layer-wise mask tuning, extended to every linear and conv).

Layers are fitted in order along the graph, each on the activations the already re-fitted pruned model feeds
it, so a fit also corrects what the pruned layers before it changed; a layer read by a residual add aims at
the add's unpruned value, making up for the stream's error too. Each fit (all weights, or one scale per input
channel) is damped towards the plainly pruned weights, chosen on held-out calibration batches it is not fitted
to, and kept only where it lowers both its layer's held-out error and the model's output error on those batches.
A layer without a bias is fitted without one: reconstruction adds no parameters (the pruned model keeps the
unpruned one's layers, and a parameter target stays met). The unpruned layers' outputs on all calibration
batches are held in memory while the layers are fitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import torch
import torch.fx as fx
from torch._ops import OpOverload

from fxopt.calibration import Calibration, model_outputs, observe, output_error, watching
from fxopt.ir.edit import add_constant, drop_unread_constants
from fxopt.ir.meta import describe_node, module_name, propagate_meta, shape_of
from fxopt.ir.program import Program
from fxopt.passes.base import PassContext
from fxopt.prune.rules import WEIGHT_ARGS, layer_weight

if TYPE_CHECKING:
    from fxopt.prune.plan import PrunePlan

__all__ = ["LayerFit", "reconstruct", "refittable", "layers_to_refit"]

aten = torch.ops.aten

# Damping tried, as fractions of each input's diagonal entry in the layer's Gram matrix (see _damped_solve).
DAMPING = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Relative errors below this are float32 rounding: a fit is not rejected for being that much "worse".
_ROUNDING = 1e-6


@dataclass(frozen=True)
class LayerFit:
    """One re-fitted layer: its relative output error against its aim on the calibration rows it was fitted to,
    before (the pruned weights) and after the fit, and on the held-out rows; ``applied`` if it was kept."""

    layer: str
    before: float
    after: float
    held_before: float
    held_after: float
    fit: str  # "weights" or "scales" and the damping chosen
    applied: bool
    weights: torch.Tensor = field(repr=False, compare=False)  # the fit: out x (inputs + 1), the bias last
    model_error: tuple[float, float] | None = None  # held-out output error without and with it, if it was undone

    def note(self) -> str:
        errors = (
            f"{self.before:.3g} -> {self.after:.3g} (held out {self.held_before:.3g} -> {self.held_after:.3g}, "
            f"fitting {self.fit})"
        )
        if self.applied:
            return f"reconstructed {self.layer}: relative output error on the calibration data {errors}"
        if self.model_error:
            return (
                f"left {self.layer} as pruned: its re-fit ({errors}) raised the model's output error on the "
                f"held-out calibration batches ({self.model_error[0]:.3g} -> {self.model_error[1]:.3g})"
            )
        return f"left {self.layer} as pruned: a re-fit did not lower its held-out error ({errors})"


def refittable(node: fx.Node) -> str | None:
    """Why ``node`` cannot be re-fitted by least squares, or None if it can."""
    weight, bias = layer_weight(node), _bias(node)
    if weight is None or len(weight.users) != 1:
        return f"{describe_node(node)} is not a linear, addmm or convolution reading a weight of its own"
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr" or len(bias.users) != 1):
        return f"{describe_node(node)} does not read a bias of its own"
    if isinstance(bias, fx.Node) and math.prod(shape_of(bias)) != shape_of(node)[_channel_dim(node)]:
        return f"{describe_node(node)} has a bias that is not one value per output"
    if node.target is aten.convolution.default:
        stride, padding, _, transposed, _, groups = node.args[3:9]
        if transposed or groups != 1 or not isinstance(stride, (list, tuple)) or len(stride) != 2:
            return f"{describe_node(node)} is not a plain 2-D convolution (transposed, grouped or not 2-D)"
    shared = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == weight.target]
    if len(shared) > 1:
        return f"{describe_node(node)} shares its weight with another layer (tied)"
    return None


def _bias(layer: fx.Node) -> object:
    """The bias argument of a linear, addmm or convolution (None if it has none)."""
    index = WEIGHT_ARGS[cast(OpOverload, layer.target)][1]
    return layer.args[index] if len(layer.args) > index else None


def _channel_dim(layer: fx.Node) -> int:
    return 1 if layer.target is aten.convolution.default else -1


def layers_to_refit(plan: PrunePlan, ctx: PassContext) -> dict[str, torch.Tensor]:
    """The layers that read a pruned group's channels and can be re-fitted (the rest noted): node name -> the
    indices of the output channels the layer keeps."""
    names: dict[str, torch.Tensor] = {}
    for candidate in plan.candidates:
        if plan.counts[candidate.group.space] == candidate.group.size:
            continue
        for member in candidate.group.members:
            if member.role != "in" or member.node.name in names:
                continue
            why = refittable(member.node)
            if why:
                ctx.skip(f"reconstructing {member.label}", why)
            else:
                names[member.node.name] = kept_outputs(plan, member.node)
    return names


def kept_outputs(plan: PrunePlan, node: fx.Node) -> torch.Tensor:
    """The output channels of ``node`` (a layer in ``plan``'s program) that pruning keeps."""
    return plan.graph.kept(plan.graph.value_dims(node)[_channel_dim(node)], plan.keep())


def reconstruct(
    program: Program, original: Program, layers: dict[str, torch.Tensor], calibration: Calibration, ctx: PassContext
) -> list[LayerFit]:
    """Re-fit the layers of ``program`` named in ``layers`` (node names, the same in ``original``, the program before
    pruning) to ``original``'s outputs on ``calibration``, those of the output channels ``layers`` gives; the
    fits are written as new constants."""
    nodes = {n.name: n for n in program.graph.nodes}
    reference_nodes = {n.name: n for n in original.graph.nodes}
    wanted = [nodes[name] for name in layers]
    held = _Split.of(len(list(calibration.flat_batches(program))))
    # A layer whose output a residual add reads aims at the add's unpruned value less the pruned stream: the fit
    # also makes up for what the layers before it changed in the stream.
    streams = {node.name: found for node in wanted if (found := _residual_stream(node))}
    aims = {name: reference_nodes[streams[name][0].name if name in streams else name] for name in layers}
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    observe(
        original,
        calibration,
        watching([(aims[name], targets[name].append) for name in layers]),
        ctx.progress,
        "reconstruction targets",
    )
    # Each group of fits is kept only if it lowers the model's output error on the held-out batches: a fit that
    # helps its own layer can still carry what it learnt of the fitted rows to the layers after it.
    checked = held.batches is not None
    reference = model_outputs(original, calibration, held.batches) if checked else []
    error = (
        output_error(calibration, model_outputs(program, calibration, held.batches), reference, "reconstruct")
        if checked
        else 0.0
    )
    fits: list[LayerFit] = []
    for stage in _stages(program, wanted, streams):
        statistics = [
            _Statistics(_Layer(n, program), held, targets[n.name], layers[n.name], n.name in streams) for n in stage
        ]
        callbacks: list[tuple[fx.Node, Callable[[torch.Tensor], None]]] = [
            (s.layer.input, s.take_input) for s in statistics
        ]
        callbacks += [(streams[s.layer.node.name][1], s.take_stream) for s in statistics if s.wants_stream]
        observe(program, calibration, watching(callbacks), ctx.progress, "reconstruction")
        solved = [stats.solve() for stats in statistics]
        for node in stage:
            targets.pop(node.name)  # memory: each layer's targets are read once
        undo = [stats.layer.write(fit.weights) for stats, fit in zip(statistics, solved) if fit.applied]
        if undo and checked:
            program.graph_module.recompile()
            now = output_error(calibration, model_outputs(program, calibration, held.batches), reference, "reconstruct")
            if now < max(error, _ROUNDING):
                error = now
            else:
                for restore in undo:
                    restore()
                solved = [replace(f, applied=False, model_error=(error, now)) if f.applied else f for f in solved]
        fits += solved
    drop_unread_constants(program)
    program.graph_module.recompile()
    propagate_meta(program.graph_module)
    return fits


def _residual_stream(layer: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, stream)`` if the layer's only reader (through copies) is a residual ``add(layer, stream)``."""
    value = layer
    while len(value.users) == 1 and next(iter(value.users)).target in (aten.clone.default, aten.alias.default):
        value = next(iter(value.users))
    add = next(iter(value.users)) if len(value.users) == 1 else None
    if add is None or add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    stream = add.args[1] if add.args[0] is value else add.args[0]
    if not isinstance(stream, fx.Node) or stream is value or shape_of(stream) != shape_of(layer):
        return None
    return add, stream


@dataclass(frozen=True)
class _Split:
    """Which calibration rows check the fits instead of making them: ``batches`` picks whole held-out batches by
    index (every fourth, at least one); with a lone batch, every fourth of its rows."""

    batches: Callable[[int], bool] | None

    @staticmethod
    def of(count: int) -> _Split:
        if count == 1:
            return _Split(None)
        chosen = {b for b in range(count) if b % 4 == 3} or {count - 1}
        return _Split(chosen.__contains__)

    def __call__(self, batch: int, rows: int) -> torch.Tensor | bool:
        return self.batches(batch) if self.batches else torch.arange(rows) % 4 == 3


def _stages(
    program: Program, layers: list[fx.Node], streams: dict[str, tuple[fx.Node, fx.Node]]
) -> list[list[fx.Node]]:
    """``layers`` grouped so that no layer's input (or stream) depends on a layer of its own or a later group."""
    chosen = set(layers)
    depth: dict[fx.Node, int] = {}
    stage_of: dict[fx.Node, int] = {}
    for node in program.graph.nodes:
        reads = node.all_input_nodes + ([streams[node.name][1]] if node.name in streams else [])
        above = max((depth[a] for a in reads), default=0)
        if node in chosen:
            stage_of[node] = above
            above += 1
        depth[node] = above
    stages: list[list[fx.Node]] = [[] for _ in range(max(stage_of.values(), default=-1) + 1)]
    for node in layers:
        stages[stage_of[node]].append(node)
    return [s for s in stages if s]


def _is_addmm(layer: fx.Node) -> bool:
    return layer.target is aten.addmm.default


class _Layer:
    """A linear, addmm or 2-D convolution as a matrix product: rows of its input (im2col for a convolution) times
    ``weight.T`` plus ``bias``, and the way back to its constants."""

    def __init__(self, node: fx.Node, program: Program):
        self.node, self.program = node, program
        weight_node, bias_node, source = layer_weight(node), _bias(node), node.args[1 if _is_addmm(node) else 0]
        assert weight_node is not None and isinstance(source, fx.Node), "refittable() admits only such layers"
        self.input, self.weight_node = source, weight_node
        self.bias_node = bias_node if isinstance(bias_node, fx.Node) else None
        weight = program.get_constant(str(weight_node.target)).detach()
        self.weight_shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        matrix = weight.T if _is_addmm(node) else weight.reshape(weight.shape[0], -1)
        self.weight = matrix.double().cpu()  # fits are solved on the CPU in float64
        self.bias = (
            program.get_constant(str(self.bias_node.target)).detach().double().cpu().reshape(-1)
            if self.bias_node is not None
            else torch.zeros(self.weight.shape[0], dtype=torch.float64)
        )

    def rows(self, value: torch.Tensor) -> torch.Tensor:
        if self.node.target is aten.convolution.default:
            stride, padding, dilation = (tuple(cast(list[int], a)) for a in self.node.args[3:6])
            size = tuple(self.weight_shape[2:])
            columns = torch.nn.functional.unfold(value, size, dilation=dilation, padding=padding, stride=stride)
            return columns.transpose(1, 2).reshape(-1, columns.shape[1]).double().cpu()
        return value.reshape(-1, value.shape[-1]).double().cpu()

    def outputs(self, value: torch.Tensor) -> torch.Tensor:
        if self.node.target is aten.convolution.default:
            return value.flatten(2).transpose(1, 2).reshape(-1, value.shape[1]).double().cpu()
        return value.reshape(-1, value.shape[-1]).double().cpu()

    @property
    def has_bias(self) -> bool:
        return self.bias_node is not None

    def write(self, fitted: torch.Tensor) -> Callable[[], None]:
        """Read the fitted weight and bias (``fitted``'s last column, zero for a layer without one) from new
        constants (the old ones may be the user's); returns what puts the old ones back."""
        node, weight_node, bias_node = self.node, self.weight_node, self.bias_node
        weight, bias = fitted[:, :-1], fitted[:, -1]
        weight = weight.T if _is_addmm(node) else weight.reshape(self.weight_shape)
        old_weight = str(weight_node.target)
        weight_node.target = add_constant(self.program, weight.to(self.device, self.dtype).contiguous(), old_weight)
        old_bias = str(bias_node.target) if bias_node is not None else ""
        if bias_node is not None:
            shape = self.program.get_constant(old_bias).shape
            bias_node.target = add_constant(self.program, bias.to(self.device, self.dtype).reshape(shape), old_bias)

        def restore() -> None:
            weight_node.target = old_weight
            if bias_node is not None:
                bias_node.target = old_bias

        return restore

    @property
    def name(self) -> str:
        return f"'{module_name(self.node) or self.node.name}'"


class _Sums:
    """``XᵀX``, ``XᵀY`` and ``‖Y‖²`` over calibration rows (X with a column of ones for the bias)."""

    def __init__(self, inputs: int, outputs: int):
        self.gram = torch.zeros(inputs + 1, inputs + 1, dtype=torch.float64)
        self.cross = torch.zeros(inputs + 1, outputs, dtype=torch.float64)
        self.energy, self.rows = 0.0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.energy += float(y.square().sum())
        self.rows += len(x)

    def error(self, w: torch.Tensor) -> float:
        """Relative error ``‖X wᵀ - Y‖ / ‖Y‖`` of ``w`` (out x inputs+1), from the sums alone."""
        if self.energy == 0:
            return 0.0
        squared = float((w @ self.gram * w).sum() - 2 * (w * self.cross.T).sum()) + self.energy
        return max(squared, 0.0) ** 0.5 / self.energy**0.5


@dataclass
class _Statistics:
    """The sums of one layer's fit, gathered batch by batch: its input rows, and the aim (its unpruned output, or
    the residual add's unpruned value less the pruned stream) on its kept output channels."""

    layer: _Layer
    held: _Split
    targets: list[torch.Tensor]
    kept: torch.Tensor
    wants_stream: bool
    fit: _Sums = field(init=False)
    check: _Sums = field(init=False)
    batch: int = 0
    rows: torch.Tensor | None = None
    stream: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.fit = _Sums(self.layer.weight.shape[1], len(self.kept))
        self.check = _Sums(self.layer.weight.shape[1], len(self.kept))

    def take_input(self, value: torch.Tensor) -> None:
        self.rows = self.layer.rows(value.detach())
        self._add()

    def take_stream(self, value: torch.Tensor) -> None:
        self.stream = self.layer.outputs(value.detach())
        self._add()

    def _add(self) -> None:
        if self.rows is None or (self.wants_stream and self.stream is None):
            return
        x, y = self.rows, self.layer.outputs(self.targets[self.batch].detach())[:, self.kept]
        if self.stream is not None:
            y = y - self.stream
        held = self.held(self.batch, len(x))
        if isinstance(held, torch.Tensor):
            self.fit.add(x[~held], y[~held])
            self.check.add(x[held], y[held])
        else:
            (self.check if held else self.fit).add(x, y)
        self.batch, self.rows, self.stream = self.batch + 1, None, None

    def solve(self) -> LayerFit:
        layer = self.layer
        plain = torch.cat([layer.weight, layer.bias[:, None]], 1)
        held_before = self.check.error(plain)
        if not self.fit.rows or not self.check.rows:
            return LayerFit(layer.name, held_before, held_before, held_before, held_before, "none", False, plain)
        # The held-out rows stay out of the fit: the layers after this one are checked on rows it has not seen.
        fits = [
            (f"{kind} {d:g}", solve(self.fit, plain, d, layer.has_bias))
            for kind, solve in _FITS.items()
            for d in DAMPING
        ]
        held_after, damping, fitted = min(((self.check.error(w), d, w) for d, w in fits), key=lambda t: t[0])
        before, after = self.fit.error(plain), self.fit.error(fitted)
        # Below float32's rounding both fits are exact: a held-out set the removed channels happened not to reach
        # (plain pruning 2e-8 off there, 5e-4 on the fitted rows) must not reject the exact fit (3.8e-8).
        applied = held_after < max(held_before, _ROUNDING) and after <= before
        return LayerFit(layer.name, before, after, held_before, held_after, damping, applied, fitted)


def _rescale(sums: _Sums, plain: torch.Tensor, damping: float, with_bias: bool) -> torch.Tensor:
    """Kwon et al.'s mask tuning: the pruned weights with one least-squares scale per input channel (and a new
    bias ``with_bias``, else none), damped towards scale 1. Few unknowns, so it holds on data the fit has not seen
    where a full re-fit of a heavily pruned layer does not."""
    weight, count = plain[:, :-1], sums.gram[-1, -1]
    sum_x, sum_y = sums.gram[-1, :-1], sums.cross[-1]
    gram, cross = sums.gram[:-1, :-1], sums.cross[:-1]
    if with_bias:  # the bias takes the means: the scales fit what is left
        gram, cross = gram - torch.outer(sum_x, sum_x) / count, cross - torch.outer(sum_x, sum_y) / count
    scale = _damped_solve(gram * (weight.T @ weight), (cross * weight.T).sum(1, keepdim=True), 1.0, damping)
    scaled = weight * scale.T
    bias = (sum_y - scaled @ sum_x) / count if with_bias else torch.zeros_like(sum_y)
    return torch.cat([scaled, bias[:, None]], 1)


def _ridge(sums: _Sums, plain: torch.Tensor, damping: float, with_bias: bool) -> torch.Tensor:
    """``argmin_w ‖X wᵀ - Y‖² + λ Σ_i G_ii ‖w_i - plain_i‖²`` (``G = XᵀX``, ``λ = damping``): pulled towards the
    pruned weights, each input's pull scaled by its size, so a weak fit changes little. Without a bias, the
    bias column stays zero."""
    if with_bias:
        return _damped_solve(sums.gram, sums.cross, plain.T, damping).T
    weight = _damped_solve(sums.gram[:-1, :-1], sums.cross[:-1], plain[:, :-1].T, damping).T
    return torch.cat([weight, torch.zeros(len(weight), 1, dtype=weight.dtype)], 1)


def _damped_solve(
    system: torch.Tensor, rhs: torch.Tensor, towards: torch.Tensor | float, damping: float
) -> torch.Tensor:
    """``(A + λD) x = b + λD towards`` with ``D = diag(A)`` (floored: an input that is always zero stays put)."""
    diagonal = system.diagonal()
    pull = damping * diagonal.clamp_min(1e-12 * float(diagonal.abs().max()) + 1e-300)
    return torch.linalg.solve(system + torch.diag(pull), rhs + pull[:, None] * towards)


_FITS = {"weights": _ridge, "scales": _rescale}
