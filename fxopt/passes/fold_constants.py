"""Constant folding of parameter-only subgraphs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant
from fxopt.ir.meta import describe_node, stamp_provenance
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option
from fxopt.passes.cse import is_pure


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate subgraphs that read only parameters and buffers once, at compile time.

    A transposed weight, a scaled bias or a precomputed position table becomes
    a new constant and the ops producing it leave the graph. Exact: the same
    ops run on the same values, once. Only the frontier of each constant
    subgraph is materialized. Folds that would grow the model (an ``expand`` of
    a bias to activation size) are skipped when the result is more than
    ``max-new-elements`` larger than its inputs. Run early, after
    ``remove-noops``; follow with ``dce`` to drop the consumed constants.
    """

    name = "fold-constants"
    max_new_elements: int = option(65536, "largest growth in elements a single fold may add to the model")

    def __post_init__(self):
        if self.max_new_elements < 0:
            raise ValueError("max-new-elements must be >= 0")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        graph = program.graph
        values: dict[fx.Node, object] = {}
        sources: dict[fx.Node, set[fx.Node]] = {}  # the constants each folded value is computed from
        for node in graph.nodes:
            if node.op == "get_attr":
                values[node] = program.get_constant(node.target)
                sources[node] = {node}
            elif node.op == "call_function" and is_pure(node) and all(n in values for n in node.all_input_nodes):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
                sources[node] = set().union(*(sources[n] for n in node.all_input_nodes))
        folded = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node not in values:
                continue
            if all(user in values for user in node.users):
                continue  # an inner node of a constant subgraph: its consumer is folded instead
            result = values[node]
            if not isinstance(result, torch.Tensor):
                continue
            inputs = sum(values[n].numel() for n in sources[node])
            if result.numel() - inputs > self.max_new_elements:
                ctx.skip(describe_node(node), f"folding adds {result.numel() - inputs} elements")
                continue
            target = add_constant(program, result.contiguous(), f"folded_{node.name}")
            with graph.inserting_before(node):
                constant = graph.get_attr(target)
            stamp_provenance([constant], self.name, [node])
            node.replace_all_uses_with(constant, propagate_meta=False)
            folded.append(node)
        for node in reversed(list(graph.nodes)):
            if node in values and node.op == "call_function" and not node.users:
                graph.erase_node(node)
        ctx.count("subgraphs-folded", len(folded))
        return bool(folded)
