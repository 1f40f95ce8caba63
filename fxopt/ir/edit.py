"""Graph editing helpers every pass uses."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from fxopt.ir.program import Program, attribute_owner

__all__ = [
    "producers",
    "users",
    "replace_node",
    "replace_subgraph",
    "read_outside",
    "add_constant",
    "erase_if_dead",
    "inline_function",
    "drop_unread_constants",
]


def producers(node: fx.Node) -> list[fx.Node]:
    """Nodes whose values ``node`` reads, in argument order, without repeats."""
    return list(node.all_input_nodes)


def users(node: fx.Node) -> list[fx.Node]:
    """Nodes that read ``node``'s value."""
    return list(node.users)


def replace_node(old: fx.Node, new: fx.Node | object) -> None:
    """Make every user of ``old`` read ``new`` instead, then erase ``old``."""
    old.replace_all_uses_with(new, propagate_meta=False)
    old.graph.erase_node(old)


def replace_subgraph(root: fx.Node, new: fx.Node | object, matched: list[fx.Node]) -> None:
    """Replace the subgraph ending at ``root`` by ``new``.

    Users of ``root`` read ``new``; the nodes in ``matched`` that no longer have
    users (the rest of the old subgraph) are erased, in reverse order.
    """
    root.replace_all_uses_with(new, propagate_meta=False)
    for node in sorted(set(matched) | {root}, key=_position(root.graph), reverse=True):
        erase_if_dead(node)


def read_outside(nodes: list[fx.Node], root: fx.Node) -> bool:
    """Whether a node of ``nodes`` other than ``root`` has a reader outside ``nodes``.

    Then :func:`replace_subgraph` at ``root`` would leave it alive: the rewrite would add work, not remove it.
    """
    inside = set(nodes)
    return any(user not in inside for node in nodes if node is not root for user in node.users)


def erase_if_dead(node: fx.Node) -> bool:
    """Erase ``node`` if nothing reads it and it is not an input or output. Returns whether it was."""
    if node.users or node.op in ("placeholder", "output"):
        return False
    node.graph.erase_node(node)
    return True


def add_constant(program: Program, tensor: torch.Tensor, name_hint: str) -> str:
    """Register ``tensor`` on the program's graph module under a fresh name and return that name.

    Passes call this instead of writing into existing parameters, whose storage
    is shared with the user's model.
    """
    gm = program.graph_module
    base = re.sub(r"[^0-9a-zA-Z_]", "_", name_hint) or "constant"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach())
    return name


def drop_unread_constants(program: Program) -> int:
    """Delete the parameters and buffers no ``get_attr`` reads any more (and emptied submodules); returns how many.

    A pass that registers replacements calls this so the program (and what is
    saved from it) does not carry the old tensors along.
    """
    gm = program.graph_module
    read = {node.target for node in program.graph.nodes if node.op == "get_attr"}
    unread = [name for name, _ in gm.named_parameters()] + [name for name, _ in gm.named_buffers()]
    unread = [name for name in unread if name not in read]
    for name in unread:
        delattr(*attribute_owner(gm, name))
    gm.delete_all_unused_submodules()
    return len(unread)


def inline_function(
    graph: fx.Graph, fn, inputs: list[fx.Node], values: list[torch.Tensor], before: fx.Node
) -> tuple[list[fx.Node], list[fx.Node]]:
    """Trace ``fn`` to canonical ATen ops and insert them before ``before``, reading ``inputs``.

    ``values`` are example tensors for ``inputs`` (tracing runs ``fn`` on them
    once). Returns the nodes holding ``fn``'s results and every node created.
    A pass uses this to compute something in the graph, at run time, that it
    would otherwise fold into a constant (e.g. weights that must stay
    trainable).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxopt.ir.canonical import decomposition_table

    traced = make_fx(fn, decomposition_table=decomposition_table())(*values)
    env: dict[fx.Node, fx.Node] = dict(zip((n for n in traced.graph.nodes if n.op == "placeholder"), inputs))
    created: list[fx.Node] = []
    results: list[fx.Node] = []
    with graph.inserting_before(before):
        for node in traced.graph.nodes:
            if node.op == "call_function":
                env[node] = graph.call_function(node.target, *fx.node.map_arg((node.args, node.kwargs), env.get))
                created.append(env[node])
            elif node.op == "output":
                results = [env[n] for n in node.args[0]]
            elif node.op != "placeholder":
                raise ValueError(f"cannot inline {node.op} node '{node.name}' (fn must not create tensor constants)")
    return results, created


def _position(graph: fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return lambda node: order.get(node, -1)
