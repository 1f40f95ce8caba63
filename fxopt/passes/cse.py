"""Common-subexpression elimination."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext


def is_pure(node: fx.Node) -> bool:
    """Whether ``node`` computes a value from its arguments alone: no mutation, no randomness."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    return not node.is_impure()


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same pure op on the same arguments into one.

    Exact: the merged nodes produce identical values. Random and mutating ops
    are never merged. Literal arguments are compared with their types, so
    ``add(x, 1)`` and ``add(x, 1.0)`` stay apart. Run after passes that expose
    duplicates (no-op removal, folding) and before ``dce``.
    """

    name = "cse"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        seen: dict[object, fx.Node] = {}
        for node in list(program.graph.nodes):
            if not is_pure(node):
                continue
            key = (node.op, node.target, _freeze(node.args), _freeze(node.kwargs))
            try:
                original = seen.setdefault(key, node)
            except TypeError:  # an unhashable literal argument: leave the node alone
                continue
            if original is not node:
                node.replace_all_uses_with(original, propagate_meta=False)
                program.graph.erase_node(node)
                ctx.count("nodes-merged")
        return bool(ctx.stats["nodes-merged"])


def _freeze(value: object) -> object:
    """A hashable key that tells apart values Python considers equal (1, 1.0, True)."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, value)
