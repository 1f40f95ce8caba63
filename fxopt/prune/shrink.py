"""Removing channels: slice every constant a pruned axis indexes and rewrite the ops' size arguments."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, drop_unread_constants
from fxopt.ir.meta import describe_node, propagate_meta, shape_of
from fxopt.ir.traits import SDPA, VIEWS
from fxopt.prune.dependency import ChannelGraph
from fxopt.prune.groups import Space
from fxopt.prune.rules import slice_args

__all__ = ["shrink"]

aten = torch.ops.aten


def shrink(graph: ChannelGraph, keep: dict[Space, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
    """Remove channels from ``graph.program``: each root axis in ``keep`` keeps only the (sorted) indices given.

    ``values`` replaces constants (by target, same shape) before they are
    sliced: weights adjusted to make up for the removed channels.

    Constants are sliced into new tensors (the originals, shared with the
    user's model, are untouched; tied weights stay tied) and every op argument
    that spells a size (view shapes, normalized shapes, group counts, split
    sizes, slice bounds, the attention scale) is rewritten; shapes are then
    propagated and checked against the trees.
    """
    program = graph.program
    renamed: dict[int, str] = {}
    for node in program.graph.nodes:
        if node.op != "get_attr" or node.target not in graph.constant_dims():
            continue
        trees = graph.constant_dims()[node.target]
        if id(trees) not in renamed:
            value = (values or {}).get(node.target, program.get_constant(node.target))
            sliced, changed = value, node.target in (values or {})
            for d, tree in enumerate(trees):
                index = graph.kept(tree, keep)
                if len(index) != value.shape[d]:
                    sliced, changed = sliced.index_select(d, index.to(value.device)), True
            renamed[id(trees)] = add_constant(program, sliced.contiguous(), node.target) if changed else node.target
        node.target = renamed[id(trees)]
    drop_unread_constants(program)

    expected: dict[fx.Node, list[int]] = {}
    for node in program.graph.nodes:
        dims = graph.dims.get(node)
        if isinstance(dims, list):
            expected[node] = [len(graph.kept(t, keep)) for t in dims]
        if node.op == "call_function":
            _rewrite_sizes(graph, node, keep, expected)
    program.graph_module.recompile()
    propagate_meta(program.graph_module)
    for node, shape in expected.items():
        if shape_of(node) != shape:
            raise AssertionError(f"pruning predicted shape {shape} for {describe_node(node)}, got {shape_of(node)}")


def _new_sizes(args: list, old: list[int], new: list[int]) -> list:
    """Size arguments with the entries whose dim changed replaced (-1 stays -1: it is inferred)."""
    return [n if o != n and a != -1 else a for a, o, n in zip(args, old, new)]


def _rewrite_sizes(
    graph: ChannelGraph, node: fx.Node, keep: dict[Space, torch.Tensor], expected: dict[fx.Node, list[int]]
) -> None:
    target, args = node.target, list(node.args)
    if target in VIEWS or target is aten.expand.default:
        args[1] = _new_sizes(list(args[1]), shape_of(node), expected[node])
    elif target in (aten.layer_norm.default, aten.rms_norm.default):
        rank = len(args[1])
        args[1] = expected[args[0]][len(expected[args[0]]) - rank :]
    elif target is aten.convolution.default and node in graph.group_counts:
        args[8] = len(graph.kept(graph.group_counts[node], keep))
    elif target is aten.group_norm.default:
        args[1] = len(graph.kept(graph.group_counts[node], keep))
    elif target in (aten.split_with_sizes.default, aten.split.Tensor):
        dim = (args[2] if len(args) > 2 else 0) % len(shape_of(args[0]))
        node.target = aten.split_with_sizes.default
        args[1] = [len(graph.kept(piece[dim], keep)) for piece in graph.dims[node]]
    elif target is aten.slice.Tensor:
        dim, start, end, step = slice_args(node)
        if step == 1 and (start, end) != (0, shape_of(args[0])[dim]):
            kept = graph.kept(graph.value_dims(args[0])[dim], keep)
            args[1:4] = [dim, int((kept < start).sum()), int((kept < end).sum())]
    elif target is SDPA and node.kwargs.get("scale") is None:
        head_dim = shape_of(args[0])[-1]
        if expected[args[0]][-1] != head_dim:
            node.kwargs = {**node.kwargs, "scale": 1 / math.sqrt(head_dim)}  # the softmax temperature stays
    node.args = tuple(args)
