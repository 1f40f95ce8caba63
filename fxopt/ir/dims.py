"""Following one tensor dimension through shape ops, casts and elementwise ops.

A rewrite that changes the features along one dimension (recentring a
residual stream, pruning channels) must know where that dimension goes:
which dim of an op's input becomes a given dim of its output, element for
element. :func:`source_dim` answers for one input of one op, or says the
dimension does not pass through intact (it is split, merged, broadcast or
sliced); :func:`result_dim` answers the other way round.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxopt.ir.layers import is_call
from fxopt.ir.meta import shape_of
from fxopt.ir.traits import ARITHMETIC, COPIES, VIEWS

__all__ = ["source_dim", "result_dim"]

aten = torch.ops.aten

# Ops whose output has the shape of their first input, element for element.


def source_dim(node: fx.Node, dim: int, source: fx.Node) -> int | None:
    """The dim of input ``source`` that becomes dim ``dim`` of ``node``'s output intact, or ``None``.

    Covers views and reshapes (when the dim is neither split nor merged),
    ``permute``, ``transpose``, ``expand`` (not along a broadcast dim),
    ``slice``/``select`` along other dims, ``cat`` along another dim, casts
    and clones, and broadcasting elementwise ops.
    """
    out, shape = shape_of(node), shape_of(source)
    if not out or not shape or not 0 <= dim < len(out):
        return None
    if is_call(node, *ARITHMETIC):
        return _broadcast_dim(out, shape, dim)
    if is_call(node, aten.cat.default):
        cat_dim = (node.args[1] if len(node.args) > 1 else 0) % len(out)
        return dim if source in node.args[0] and cat_dim != dim else None
    if node.args[0] is not source:
        return None
    if is_call(node, *COPIES):
        return dim
    if is_call(node, aten.permute.default):
        return node.args[1][dim] % len(shape)
    if is_call(node, aten.transpose.int):
        a, b = (d % len(out) for d in node.args[1:3])
        return {a: b, b: a}.get(dim, dim)
    if is_call(node, aten.expand.default):
        return _broadcast_dim(out, shape, dim)
    if is_call(node, aten.slice.Tensor):
        sliced = (node.args[1] if len(node.args) > 1 else 0) % len(out)
        return dim if sliced != dim else None
    if is_call(node, aten.select.int):
        selected = node.args[1] % len(shape)
        return dim if dim < selected else dim + 1
    if is_call(node, *VIEWS):
        return _view_dim(out, shape, dim)
    return None


def result_dim(node: fx.Node, source: fx.Node, dim: int) -> int | None:
    """The dim of ``node``'s output that dim ``dim`` of input ``source`` becomes intact, or ``None``."""
    matches = [d for d in range(len(shape_of(node))) if source_dim(node, d, source) == dim]
    return matches[0] if len(matches) == 1 else None


def _broadcast_dim(out: list, shape: list, dim: int) -> int | None:
    """The dim of a broadcast operand matching ``dim`` of the result, unless the operand is broadcast along it."""
    d = dim - (len(out) - len(shape))
    return d if d >= 0 and shape[d] == out[dim] else None


def _view_dim(out: list, shape: list, dim: int) -> int | None:
    """The input dim a view keeps whole as output dim ``dim``: same size, same number of elements before it."""
    before = math.prod(out[:dim])
    for d, size in enumerate(shape):
        if size == out[dim] and math.prod(shape[:d]) == before:
            return d
    return None
