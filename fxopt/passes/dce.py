"""Dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.ir.program import Program, attribute_owner
from fxopt.passes.base import Pass, PassContext


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose values nothing reads, and the constants no node reads any more.

    Exact: only unread values go. Ops with side effects are kept; model inputs
    are never removed (they are the calling convention). Belongs at the end of a
    pipeline and after any pass that leaves replaced nodes behind.
    """

    name = "dce"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        graph = program.graph
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        removed_nodes = before - len(graph.nodes)
        removed_constants = _drop_unread_constants(program)
        ctx.count("nodes-removed", removed_nodes)
        ctx.count("constants-removed", removed_constants)
        return bool(removed_nodes or removed_constants)


def _drop_unread_constants(program: Program) -> int:
    gm = program.graph_module
    read = {node.target for node in program.graph.nodes if node.op == "get_attr"}
    unread = [name for name, _ in gm.named_parameters()] + [name for name, _ in gm.named_buffers()]
    unread = [name for name in unread if name not in read]
    for name in unread:
        delattr(*attribute_owner(gm, name))
    gm.delete_all_unused_submodules()
    return len(unread)
