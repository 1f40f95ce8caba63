"""Layout ops read through: a hand kernel reads the tensor a chain of views, permutes, slices and splits starts
from, through the chain's index map, instead of a copy the chain makes.

A transformer feeds attention through such chains (GPT-2: the fused Q/K/V projection viewed as ``[1, 128, 2304]``,
split in three, each viewed as ``[1, 128, 12, 64]`` and permuted to heads first), and each is a kernel of its own
copying the values once more. :func:`read_through` walks back from a kernel's input to the start of its chain;
the kernel takes that tensor and an index map, and the chain's copies, now unread, are removed as dead code.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx

from fxopt.ir.traits import VIEWS

__all__ = ["Gather", "read_through", "RESHAPES"]

aten = torch.ops.aten

Index = list  # one index expression (TE/TIR or int) per dimension
#: Ops that keep the elements' order: reshapes, whatever the new shape.
RESHAPES = {
    *VIEWS,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}


@dataclass(eq=False)
class Gather:
    """``node``'s value read from ``source``: ``value[i] == source[index(i)]``."""

    node: fx.Node
    source: fx.Node
    steps: list[Callable[[Index], Index]] = field(default_factory=list)  # node's index → source's, one op each
    chain: list[fx.Node] = field(default_factory=list)  # the layout ops read through, from node back

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.meta["val"].shape)

    def index(self, index: Index) -> Index:
        for step in self.steps:
            index = step(index)
        return index


def read_through(node: fx.Node) -> Gather:
    """``node``'s value as a gather from the start of its chain of layout ops (``node`` itself when it is no
    layout op): views, reshapes and (un)squeezes, permutes and transposes, slices with a step, selects, a split's
    parts, clones."""
    gather = Gather(node, node)
    while (read := _step(gather.source)) is not None:
        gather.chain.append(gather.source)
        if gather.source.target is operator.getitem:
            gather.chain.append(cast(fx.Node, gather.source.args[0]))  # the split
        gather.source, step = read
        gather.steps.append(step)
    return gather


def _step(node: fx.Node) -> tuple[fx.Node, Callable[[Index], Index]] | None:
    """The input ``node`` reads and how its index maps to that input's, for a layout op; else None."""
    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.Tensor):
        return None
    if node.target is operator.getitem:
        return _split_part(node)
    args: list[Any] = list(node.args)  # FX types them as any argument; checked here by the op's schema
    source = args[0] if args else None
    if not isinstance(source, fx.Node) or not isinstance(source.meta.get("val"), torch.Tensor):
        return None
    rank = source.meta["val"].dim()
    if node.target in RESHAPES:
        reshape = _reshape(list(value.shape), list(source.meta["val"].shape))
        return None if reshape is None else (source, reshape)
    if node.target is aten.permute.default:
        dims = [d % rank for d in args[1]]
        return source, lambda index: [index[dims.index(d)] for d in range(rank)]
    if node.target in (aten.transpose.int, aten.t.default):
        a, b = (args[1] % rank, args[2] % rank) if len(args) > 2 else (0, rank - 1)
        return source, lambda index: [index[{a: b, b: a}.get(d, d)] for d in range(rank)]
    if node.target is aten.slice.Tensor:
        dim = args[1] % rank if len(args) > 1 else 0
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        start = start + source.meta["val"].shape[dim] if start < 0 else start
        step = args[4] if len(args) > 4 else 1
        return source, _shifted(dim, start, step)
    if node.target is aten.select.int:
        dim, at = args[1] % rank, args[2] % source.meta["val"].shape[args[1] % rank]
        return source, lambda index: [*index[:dim], at, *index[dim:]]
    if node.target in (aten.clone.default, aten.alias.default):
        return source, lambda index: index
    return None


def _split_part(item: fx.Node) -> tuple[fx.Node, Callable[[Index], Index]] | None:
    split, part = cast(tuple[Any, int], item.args)
    if not (isinstance(split, fx.Node) and split.target in (aten.split_with_sizes.default, aten.split.Tensor)):
        return None
    args: list[Any] = list(split.args)
    source, sizes = args[0], args[1]
    dim = (args[2] if len(args) > 2 else split.kwargs.get("dim", 0)) % source.meta["val"].dim()
    offset = sizes * part if split.target is aten.split.Tensor else sum(sizes[:part])
    return source, _shifted(dim, offset, 1)


def _shifted(dim: int, start: int, step: int) -> Callable[[Index], Index]:
    return lambda index: [start + i * step if d == dim else i for d, i in enumerate(index)]


def _reshape(shape: Sequence[int], source: Sequence[int]) -> Callable[[Index], Index] | None:
    """Index map of a reshape from ``source`` to ``shape``: dims grouped where their sizes' products meet, so a
    split or merged dimension costs a multiply-add and only a regrouping divides. None for an empty tensor."""
    if 0 in shape or 0 in source:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(shape) and j < len(source):
        outs, ins = [i], [j]
        product_out, product_in = shape[i], source[j]
        i, j = i + 1, j + 1
        while product_out != product_in:
            if product_out < product_in:
                outs.append(i)
                product_out *= shape[i]
                i += 1
            else:
                ins.append(j)
                product_in *= source[j]
                j += 1
        groups.append((outs, [d for d in ins if source[d] != 1]))  # dims left over, or of size 1, read index 0

    def step(index: Index) -> Index:
        result: Index = [0] * len(source)
        for outs, ins in groups:
            flat = 0
            for d in outs:
                flat = flat * shape[d] + index[d] if shape[d] != 1 else flat
            for position, d in enumerate(ins):
                inner = math.prod(source[e] for e in ins[position + 1 :])
                part = flat // inner if inner > 1 else flat
                result[d] = part % source[d] if position else part
        return result

    return step
