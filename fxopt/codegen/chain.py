"""Consecutive TVM segments as one Relax function: one VM call where PyTorch would run nothing in between.

A partition calls each segment from the parent graph, and every call crosses to
PyTorch and back (DLPack, a tuple of outputs, ``getitem``). A PyTorch op between
two TVM calls costs more than its own time: PyTorch's OpenMP workers keep spinning
after it on the cores TVM's next kernel wants (on 2 cores a 0.03 ms copy made the
next BERT segment 4 ms slower). A *chain* is a maximal run of segment calls with
nothing but their outputs' ``getitem`` between them; it is lowered as a Relax
function calling the segments' functions in turn, so the run is one VM call.

The parent graph is rewritten on a copy (:func:`chained_parent`); which plan runs
(per segment, chained, or PyTorch alone) is measured by the caller.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx

from fxopt.codegen.lower import tensor_var
from fxopt.ir.program import attribute_owner

__all__ = ["Chain", "find_chains", "lower_chain", "chained_parent"]


@dataclass
class Chain:
    """A run of segment calls in the parent graph, and the values it reads and gives to the rest."""

    name: str
    calls: list[fx.Node]  # the segments' call_module nodes, in order
    inputs: list[fx.Node]  # parent values the run reads (placeholders, other ops' results)
    outputs: list[fx.Node]  # the run's getitem nodes read outside it

    @property
    def segments(self) -> list[str]:
        return [str(call.target) for call in self.calls]


def find_chains(parent: fx.GraphModule, segments: set[str]) -> list[Chain]:
    """Maximal runs of two or more calls of ``segments`` in ``parent`` with only their getitems in between."""
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in parent.graph.nodes:
        if node.op == "call_module" and node.target in segments:
            current.append(node)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in current:
            continue
        elif node.op in ("call_function", "call_method", "call_module", "output"):
            runs.append(current)
            current = []
    runs.append(current)
    chains: list[Chain] = []
    for calls in runs:
        if len(calls) < 2:
            continue
        members = set(calls)
        items = {item for call in calls for item in call.users}
        args = [a for call in calls for a in call.args]
        if not all(isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) for a in args):
            continue  # a segment input that is no tensor: the segment stays a call of its own
        inputs = list(dict.fromkeys(a for a in args if isinstance(a, fx.Node) and a not in items))
        outputs = [item for item in items if any(user not in members for user in item.users)]
        outputs.sort(key=lambda item: (calls.index(cast(fx.Node, item.args[0])), item.args[1]))
        chains.append(Chain(f"chain_{len(chains)}", calls, inputs, outputs))
    return chains


def lower_chain(chain: Chain, module) -> None:
    """Add to ``module`` (the IRModule holding the segments' functions) the Relax function ``chain.name``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = {node: tensor_var(node.name, node.meta["val"]) for node in chain.inputs}
    values = dict(params)
    with bb.function(chain.name, params=list(params.values())):
        for call in chain.calls:
            arguments = [values[cast(fx.Node, a)] for a in call.args]
            result = bb.emit(relax.Call(module.get_global_var(call.target), arguments))
            for item in call.users:
                values[item] = bb.emit(relax.TupleGetItem(result, item.args[1]))
        bb.emit_func_output(bb.emit(relax.Tuple([values[item] for item in chain.outputs])))
    module.update(bb.get())


def chained_parent(parent: fx.GraphModule, kernels: dict[str, torch.nn.Module], chains: list[Chain]) -> fx.GraphModule:
    """A copy of ``parent`` running ``kernels`` (by segment or chain name) in place of the segments, each chain
    as one call. ``parent`` is left as it was."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    chain_of = {call: chain for chain in chains for call in chain.calls}
    for node in parent.graph.nodes:
        chain = chain_of.get(node)
        if chain is None:
            if node not in copies:
                copies[node] = graph.node_copy(node, lambda n: copies[n])
            continue
        if node is not chain.calls[0]:
            continue
        call = graph.call_module(chain.name, tuple(copies[a] for a in chain.inputs))
        for index, item in enumerate(chain.outputs):
            copies[item] = graph.call_function(operator.getitem, (call, index))
            copies[item].meta = dict(item.meta)
        for member in chain.calls:  # items only the chain reads need no copy
            copies.update({item: copies.get(item, call) for item in member.users})
    root = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = kernels[node.target] if node.target in kernels else parent.get_submodule(node.target)
        elif node.op == "get_attr":
            root[node.target] = getattr(*attribute_owner(parent, node.target))
    return fx.GraphModule(root, graph, class_name=type(parent).__name__)
