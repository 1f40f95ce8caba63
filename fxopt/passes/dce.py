"""Dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.ir.edit import drop_unread_constants
from fxopt.ir.program import Program
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
        removed_constants = drop_unread_constants(program)
        ctx.count("nodes-removed", removed_nodes)
        ctx.count("constants-removed", removed_constants)
        return bool(removed_nodes or removed_constants)
