"""Equivalent transformations of an activation's channels, compensated in the layers that read it.

Smoothing (SmoothQuant) divides each channel of an activation by ``s`` and
multiplies the matching input columns of the reading layers' weights by ``s``;
shifting (Outlier Suppression+) subtracts ``delta`` and adds ``W @ delta`` to
the readers' biases. Both leave the readers' outputs unchanged in exact
arithmetic (float32 rounding aside) and make the activation easier to
quantize. The changed activation is computed by a new ``mul``/``sub`` node
that only the readers see, or, when the activation is a LayerNorm's output
read by nothing else, folded into the norm's weight and bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from fxopt.calibration import Calibration, observe
from fxopt.ir.edit import add_constant, erase_if_dead
from fxopt.ir.layers import WeightedLayer, is_call, is_constant, weighted_layers
from fxopt.ir.meta import stamp_provenance
from fxopt.ir.program import Program

__all__ = [
    "linear_readers",
    "calibrated_readers",
    "channel_statistics",
    "input_moments",
    "scale_channels",
    "shift_channels",
]

aten = torch.ops.aten


def linear_readers(program: Program) -> dict[fx.Node, list[WeightedLayer]]:
    """Activations read as the input of linear layers (linear, addmm), with those layers.

    Features are along the last dim, which is what the layers' weight columns
    index. An activation also read by other ops is included: they keep reading
    the original. Only float32 activations: in float16/bfloat16 the scaled or
    shifted copy adds a rounding of its own (bfloat16 outputs moved by 1% of
    their scale, past the half-precision tolerance; found by
    tests/property/test_random_dags.py).
    """
    readers: dict[fx.Node, list[WeightedLayer]] = {}
    layers, _ = weighted_layers(program)
    for layer in layers:
        if layer.kind in ("linear", "addmm") and layer.x.meta["val"].dtype == torch.float32:
            readers.setdefault(layer.x, []).append(layer)
    return readers


def calibrated_readers(
    program: Program, calibration: Callable[[], Calibration], progress: Callable[[str], None] | None = None
):
    """``(activation, reading layers, per-channel min, per-channel max)`` for every activation linear layers read;
    ``calibration()`` is asked for the data only when there is one."""
    readers = linear_readers(program)
    if not readers:
        return []
    stats = channel_statistics(program, calibration(), readers, progress)
    return [(x, layers, *stats[x]) for x, layers in readers.items()]


def channel_statistics(
    program: Program, calibration: Calibration, nodes: Iterable[fx.Node], progress: Callable[[str], None] | None = None
) -> dict[fx.Node, tuple[torch.Tensor, ...]]:
    """Per-channel (last dim) ``(min, max)`` of each activation over the calibration data."""
    stats: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(node: fx.Node) -> Callable[[torch.Tensor], None]:
        def record(value: torch.Tensor) -> None:
            flat = value.detach().float().reshape(-1, value.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            if node in stats:
                lo, hi = torch.minimum(stats[node][0], lo), torch.maximum(stats[node][1], hi)
            stats[node] = (lo, hi)

        return record

    observe(program, calibration, {n: update(n) for n in nodes}, progress, "channel ranges")
    return stats


def input_moments(
    program: Program, calibration: Calibration, nodes: Iterable[fx.Node], progress: Callable[[str], None] | None = None
) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
    """``(E[x xᵀ], E|x|)`` over the calibration data of each activation (features along the last dim).

    The second moment says how much each direction of a layer's input is
    exercised: a weight error ``d`` changes the layer's output by ``dᵀ H d``
    in the mean. float64 sums; memory is one ``features²`` matrix each.
    """
    sums: dict[fx.Node, list] = {}

    def accumulate(node: fx.Node) -> Callable[[torch.Tensor], None]:
        def update(value: torch.Tensor) -> None:
            flat = value.detach().reshape(-1, value.shape[-1]).double()
            previous = sums.get(node, (0, 0, 0))
            sums[node] = [previous[0] + flat.T @ flat, previous[1] + flat.abs().sum(0), previous[2] + len(flat)]

        return update

    observe(program, calibration, {n: accumulate(n) for n in nodes}, progress, "second moments")
    return {n: (square / max(rows, 1), absolute / max(rows, 1)) for n, (square, absolute, rows) in sums.items()}


def scale_channels(
    program: Program, x: fx.Node, readers: list[WeightedLayer], scale: torch.Tensor, pass_name: str
) -> None:
    """Readers read ``x / scale`` (per last-dim channel) and multiply their weight columns by ``scale``."""
    for layer in readers:
        _set_weight(program, layer, layer.weight_value(program).double() * scale.double(), pass_name)
    _change_input(
        program,
        x,
        readers,
        pass_name,
        aten.mul.Tensor,
        1 / scale.double(),
        lambda w, b: (w.double() / scale.double(), None if b is None else b.double() / scale.double()),
    )


def shift_channels(
    program: Program, x: fx.Node, readers: list[WeightedLayer], delta: torch.Tensor, pass_name: str
) -> None:
    """Readers read ``x - delta`` (per last-dim channel) and add ``W @ delta`` to their biases."""
    for layer in readers:
        weight = layer.weight_value(program).double()
        bias = weight @ delta.double()
        if layer.bias is not None:
            bias = bias + program.get_constant(layer.bias.target).double()
        _set_bias(program, layer, bias, pass_name)
    _change_input(
        program,
        x,
        readers,
        pass_name,
        aten.sub.Tensor,
        delta.double(),
        lambda w, b: (w, -delta.double() if b is None else b.double() - delta.double()),
    )


def _change_input(
    program: Program, x: fx.Node, readers: list[WeightedLayer], pass_name: str, op, operand, fold: Callable
) -> None:
    """Make ``readers`` read ``op(x, operand)``: folded into ``x``'s LayerNorm when nothing else reads it."""
    dtype = x.meta["val"].dtype
    if (
        is_call(x, aten.layer_norm.default)
        and len(x.args) >= 3
        and is_constant(x.args[2])
        and set(x.users) == {layer.node for layer in readers}
    ):
        weight_node = x.args[2]
        bias_node = x.args[3] if len(x.args) > 3 else None
        if bias_node is None or is_constant(bias_node):
            weight = program.get_constant(weight_node.target)
            bias = None if bias_node is None else program.get_constant(bias_node.target)
            new_weight, new_bias = fold(weight, bias)
            args = list(x.args) + [None] * (4 - len(x.args))
            with program.graph.inserting_before(x):
                if new_weight is not weight:  # a shift leaves the norm's weight as it is
                    args[2] = program.graph.get_attr(
                        add_constant(program, new_weight.to(weight.dtype), f"{pass_name}_w")
                    )
                if new_bias is not None:
                    args[3] = program.graph.get_attr(add_constant(program, new_bias.to(weight.dtype), f"{pass_name}_b"))
            x.args = tuple(args)
            for old in (weight_node, bias_node):
                if old is not None:
                    erase_if_dead(old)
            stamp_provenance([a for a in args[2:4] if isinstance(a, fx.Node) and a is not weight_node], pass_name, [x])
            return
    with program.graph.inserting_after(x):
        constant = program.graph.get_attr(add_constant(program, operand.to(dtype), f"{pass_name}_{x.name}"))
    with program.graph.inserting_after(constant):
        changed = program.graph.call_function(op, (x, constant))
    changed.meta["val"] = x.meta["val"]
    stamp_provenance([constant, changed], pass_name, [x])
    for layer in readers:
        layer.node.replace_input_with(x, changed)


def _set_weight(program: Program, layer: WeightedLayer, weight: torch.Tensor, pass_name: str) -> None:
    original = program.get_constant(layer.weight.target)
    stored = (weight.T if layer.kind == "addmm" else weight).to(original.dtype).contiguous()
    _replace_constant(program, layer, layer.weight, stored, pass_name)


def _set_bias(program: Program, layer: WeightedLayer, bias: torch.Tensor, pass_name: str) -> None:
    dtype = program.get_constant(layer.weight.target).dtype
    if layer.bias is not None:
        _replace_constant(program, layer, layer.bias, bias.to(dtype), pass_name)
        return
    with program.graph.inserting_before(layer.node):
        node = program.graph.get_attr(add_constant(program, bias.to(dtype), f"{pass_name}_bias"))
    stamp_provenance([node], pass_name, [layer.node])
    args = list(layer.node.args) + [None] * (3 - len(layer.node.args))
    args[2] = node  # linear(x, w, bias); addmm always has its bias
    layer.node.args = tuple(args)


def _replace_constant(
    program: Program, layer: WeightedLayer, old: fx.Node, tensor: torch.Tensor, pass_name: str
) -> None:
    with program.graph.inserting_before(layer.node):
        new = program.graph.get_attr(add_constant(program, tensor, f"{pass_name}_{old.target}"))
    stamp_provenance([new], pass_name, [old])
    layer.node.replace_input_with(old, new)
    erase_if_dead(old)
