"""Marking conv/matmul epilogues (bias, activation, residual add) for the backend to emit as one kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.layers import is_constant
from fxopt.ir.meta import EPILOGUE
from fxopt.ir.program import Program
from fxopt.ir.traits import ACTIVATIONS
from fxopt.passes.base import Pass, PassContext

aten = torch.ops.aten

ANCHORS = {
    aten.convolution.default: "conv",
    torch.ops.fxopt.conv2d_blocked.default: "conv",
    aten.linear.default: "linear",
    aten.mm.default: "matmul",
    aten.bmm.default: "matmul",
    aten.addmm.default: "matmul",
}
_CONSTANT_OPS = {aten.add.Tensor: "bias", aten.mul.Tensor: "scale"}


@dataclass(frozen=True)
class MarkEpilogues(Pass):
    """Mark each conv/linear/matmul and the elementwise chain after it as one epilogue group.

    A group is the anchor followed, each op the only reader of the one before,
    by any of: a bias or scale by a constant, an activation (ReLU, GELU, SiLU,
    sigmoid, tanh, clamps...), and at most one residual add of a tensor of the
    same shape (ResNet's conv, add, ReLU); a node joins one group at most (an
    add of two anchors' outputs, the later one's). The nodes get
    ``meta["fxopt_epilogue"]`` = the anchor's name; the TVM backend keeps each
    group inside one partition segment (moving its nodes together when the
    graph interleaves them with other ops) so its fusion emits the group as
    one kernel. Statistics count groups by shape (``conv+residual+relu``).

    Exact: the graph is not changed, only annotated. Run last: nodes that
    later passes create carry no marks.
    """

    name = "mark-epilogues"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        for node in program.graph.nodes:
            node.meta.pop(EPILOGUE, None)  # marks of an earlier run may be stale
        marked = False
        # Latest anchor first: an add of two anchors' outputs joins the later one, which the graph
        # already places next to it.
        for anchor in reversed([n for n in program.graph.nodes if n.op == "call_function" and n.target in ANCHORS]):
            members, roles = _epilogue(anchor)
            if not members:
                continue
            for node in [anchor, *members]:
                node.meta[EPILOGUE] = anchor.name
            ctx.count("+".join([ANCHORS[anchor.target], *roles]))
            marked = True
        return marked  # the annotations are the change


def _epilogue(anchor: fx.Node) -> tuple[list[fx.Node], list[str]]:
    members, roles = [], []
    node = anchor
    while len(node.users) == 1:
        (user,) = node.users
        role = None if EPILOGUE in user.meta else _role(user, node, has_residual="residual" in roles)
        if role is None:
            break
        members.append(user)
        roles.append(role)
        node = user
    return members, roles


def _role(user: fx.Node, value: fx.Node, has_residual: bool) -> str | None:
    """What ``user`` does to ``value`` as part of an epilogue, or ``None`` when it ends the group."""
    if user.op != "call_function" or not _same_shape(user, value):
        return None
    if user.target in ACTIVATIONS and user.args[0] is value:
        return user.target.__name__.split(".")[0]
    if user.target in _CONSTANT_OPS and user.kwargs.get("alpha", 1) == 1:
        other = user.args[1] if user.args[0] is value else user.args[0]
        if is_constant(other) or isinstance(other, (int, float)):
            return _CONSTANT_OPS[user.target]
        if user.target is aten.add.Tensor and not has_residual and isinstance(other, fx.Node):
            return "residual"
    return None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (
        isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype
    )
