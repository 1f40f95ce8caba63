"""Whole-graph analyses: a networkx view, FLOP and parameter counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils.flop_counter import flop_registry

from fxopt.ir.meta import tensor_summary
from fxopt.ir.program import Program

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["to_networkx", "count_flops", "count_parameters", "node_flops"]


def to_networkx(program: Program) -> nx.DiGraph:
    """The dataflow graph: one vertex per fx node (keyed by name), an edge producer → user.

    Vertex attributes: ``op``, ``target`` (string), ``value`` (``f32[1,8]``-style
    summary) and ``node`` (the fx node itself, for analyses that need more). networkx is imported here, not
    by ``import fxopt``.
    """
    import networkx as nx

    graph = nx.DiGraph(name=program.name)
    for node in program.graph.nodes:
        graph.add_node(
            node.name, op=node.op, target=str(node.target), value=tensor_summary(node.meta.get("val")), node=node
        )
        for producer in node.all_input_nodes:
            graph.add_edge(producer.name, node.name)
    return graph


def node_flops(node: fx.Node, value: Callable[[fx.Node], object] | None = None) -> int:
    """Floating-point operations of one node (2 per multiply-add of matmuls, convolutions, attention).

    Elementwise and data-movement ops count zero, the usual convention for
    model FLOPs. ``value`` gives the tensor of a node (default: its
    ``meta["val"]``); pruning passes shaped meta tensors to cost a plan.
    """
    if node.op != "call_function":
        return 0
    value = value or _meta_value
    target = node.target
    formula = flop_registry.get(target) or flop_registry.get(getattr(target, "overloadpacket", None))
    try:
        if formula is None:
            flops = _composite_flops(node, value)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            flops = formula(*args, **kwargs, out_val=value(node))
    except Exception:  # symbolic (dynamic) shapes have no number of FLOPs: count them as unknown
        return 0
    # A count of symbolic (dynamic) sizes is unknown too: int() of it would specialize the graph's shape symbols
    # to the example input's sizes (a dynamic batch became 2 for every pass after the first FLOP count).
    return int(flops) if not isinstance(flops, torch.SymInt) or is_concrete_int(flops) else 0


def _meta_value(node: fx.Node) -> object:
    return node.meta.get("val")


def _composite_flops(node: fx.Node, value: Callable[[fx.Node], object]) -> int | torch.SymInt:
    # linear is preserved whole in fxopt's op set; the registry only knows its decomposition
    if node.target is torch.ops.aten.linear.default:
        x, w = value(node.args[0]), value(node.args[1])
        return 2 * x.numel() * w.shape[0]
    if node.target is torch.ops.fxopt.conv2d_blocked.default:  # each output element: a dot over C/groups x KH x KW
        out, w = value(node), value(node.args[1])
        return 2 * out.numel() * w[0].numel()
    return 0


def count_flops(program: Program) -> int:
    """Total FLOPs of one call on the captured input shapes."""
    return sum(node_flops(node) for node in program.graph.nodes)


def count_parameters(program: Program) -> int:
    """Number of elements in all constant tensors (parameters and buffers) the graph reads."""
    seen: set[int] = set()
    total = 0
    for _, tensor in program.constants():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total
