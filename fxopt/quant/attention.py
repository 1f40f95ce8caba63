"""int8 attention (``quantize{attention=int8}``): which ``scaled_dot_product_attention`` nodes can become
``fxopt::attention_q``, the per-head scales of their Q, K and V calibrated, and the error each one's integer form
makes on the calibration data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.calibration import Calibration, observe, watching
from fxopt.ir.edit import add_constant, replace_node
from fxopt.ir.meta import stamp_provenance
from fxopt.ir.numerics import relative_rms_error
from fxopt.ir.traits import SDPA
from fxopt.quant.formats import INT8
from fxopt.quant.ops import attention_q

__all__ = ["AttentionLayer", "attention_layers", "calibrate_attention", "rewrite_attention"]


@dataclass
class AttentionLayer:
    """An attention node to quantize: its scale (``1/sqrt(dim)`` unless given), and once calibrated its per-head
    scales of Q, K and V (``[heads]`` each) and the relative RMS error of its int8 form's output on the
    calibration data."""

    node: fx.Node
    scale: float
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    error: float = float("nan")

    @property
    def inputs(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        return self.node.args[0], self.node.args[1], self.node.args[2]  # type: ignore[return-value]

    @property
    def mask(self) -> fx.Node | None:
        return _argument(self.node, 3, "attn_mask", None)

    @property
    def is_causal(self) -> bool:
        return bool(_argument(self.node, 5, "is_causal", False))

    def quantized(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The int8 form's output on ``q``, ``k``, ``v`` and ``mask``."""
        assert self.scales is not None
        return attention_q(q, k, v, mask, *self.scales, self.scale, self.is_causal)


def _argument(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def attention_layers(program) -> tuple[list[AttentionLayer], list[tuple[fx.Node, str]]]:
    """The attention nodes ``attention_q`` can replace, and the others with the reason: Q, K and V float32,
    4-D ``[batch, heads, length, dim]``, as many heads each, no dropout."""
    layers, refused = [], []
    for node in program.graph.nodes:
        if node.target is not SDPA:
            continue
        values = [a.meta["val"] for a in node.args[:3]]
        if any(v.dim() != 4 or v.dtype != torch.float32 for v in values):
            refused.append((node, "int8 attention takes 4-D float32 Q, K and V"))
        elif len({v.shape[1] for v in values}) > 1:
            refused.append((node, "int8 attention takes as many heads of K and V as of Q (no grouped queries)"))
        elif _argument(node, 4, "dropout_p", 0.0):
            refused.append((node, "attention with dropout is not deterministic"))
        else:
            given = node.kwargs.get("scale")
            layers.append(AttentionLayer(node, float(given) if given is not None else values[0].shape[-1] ** -0.5))
    return layers, refused


def calibrate_attention(
    program, calibration: Calibration, layers: list[AttentionLayer], progress: Callable[[str], None] | None = None
) -> None:
    """Each layer's per-head scales (symmetric int8 over each head's largest magnitude of Q, K and V on the
    calibration data), then the relative RMS error of its int8 output against the float one on the same data
    (the layer alone: its float inputs)."""
    largest: dict[fx.Node, torch.Tensor] = {}

    def track(node: fx.Node) -> Callable[[torch.Tensor], None]:
        def update(value: torch.Tensor) -> None:
            heads = value.detach().abs().amax((0, 2, 3)).float()
            largest[node] = torch.maximum(largest[node], heads) if node in largest else heads

        return update

    inputs = {node for layer in layers for node in layer.inputs}
    observe(program, calibration, {node: track(node) for node in inputs}, progress, "attention ranges")
    for layer in layers:
        layer.scales = tuple(  # type: ignore[assignment]
            torch.where(largest[n] > 0, largest[n] / INT8.symmetric_max, torch.ones(())) for n in layer.inputs
        )

    seen: dict[fx.Node, torch.Tensor] = {}
    outputs: dict[fx.Node, list[torch.Tensor]] = {layer.node: [] for layer in layers}
    reference: dict[fx.Node, list[torch.Tensor]] = {layer.node: [] for layer in layers}

    def keep(node: fx.Node) -> Callable[[torch.Tensor], None]:
        return lambda value: seen.__setitem__(node, value)

    def compare(layer: AttentionLayer) -> Callable[[torch.Tensor], None]:
        def update(value: torch.Tensor) -> None:
            q, k, v = (seen[n] for n in layer.inputs)
            mask = seen.get(layer.mask) if isinstance(layer.mask, fx.Node) else None
            outputs[layer.node].append(layer.quantized(q, k, v, mask))
            reference[layer.node].append(value)

        return update

    watched = [
        (node, keep(node)) for node in inputs | {layer.mask for layer in layers if isinstance(layer.mask, fx.Node)}
    ]
    watched += [(layer.node, compare(layer)) for layer in layers]
    observe(program, calibration, watching(watched), progress, "attention errors")
    for layer in layers:
        layer.error = float(relative_rms_error(outputs[layer.node], reference[layer.node]))


def rewrite_attention(program, layers: list[AttentionLayer], pass_name: str) -> None:
    """Replace each calibrated layer's node by ``fxopt::attention_q`` with its scales stored in ``program``."""
    graph = program.graph
    for layer in layers:
        assert layer.scales is not None
        hint = layer.node.name
        with graph.inserting_before(layer.node):
            scales = [
                graph.get_attr(add_constant(program, s.contiguous(), f"{hint}_{name}_scale"))
                for s, name in zip(layer.scales, "qkv")
            ]
            new = graph.call_function(
                torch.ops.fxopt.attention_q.default,
                (*layer.inputs, layer.mask, *scales, layer.scale, layer.is_causal),
            )
        stamp_provenance([new], pass_name, [layer.node])
        replace_node(layer.node, new)
