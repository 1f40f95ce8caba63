"""Structural and metadata verification of a :class:`~fxopt.ir.Program`."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.errors import VerificationError
from fxopt.ir.canonical import is_canonical_target
from fxopt.ir.meta import describe_node, propagate_meta, tensor_summary
from fxopt.ir.program import Program

__all__ = ["verify"]


def verify(program: Program, *, check_meta: bool = True) -> None:
    """Raise :class:`VerificationError` unless ``program`` is well formed.

    Checks: the fx graph lints; placeholders and outputs agree with the pytree
    specs; every op is in the canonical op set; every ``get_attr`` names a
    tensor; every value-producing node carries ``meta["val"]``; and (with
    ``check_meta``) the stored shapes and dtypes equal freshly propagated ones.
    """
    gm = program.graph_module
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"{program.name}: malformed graph: {exc}") from None
    n_inputs = len(program.placeholders())
    if n_inputs != program.in_spec.num_leaves:
        raise VerificationError(
            f"{program.name}: graph has {n_inputs} inputs but the calling convention has {program.in_spec.num_leaves}"
        )
    outputs = gm.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != program.out_spec.num_leaves:
        raise VerificationError(
            f"{program.name}: graph output must be a flat tuple of {program.out_spec.num_leaves} values"
        )
    for node in gm.graph.nodes:
        _verify_node(program, node)
    if check_meta:
        _verify_meta(program)


def _verify_node(program: Program, node: fx.Node) -> None:
    if node.op == "call_module":
        raise VerificationError(f"{describe_node(node)}: call_module nodes are not allowed in fxopt IR")
    if node.op == "call_function" and not is_canonical_target(node.target):
        raise VerificationError(
            f"{describe_node(node)}: {node.target} is outside fxopt's canonical op set "
            f"(core ATen plus fxopt.ir.canonical.PRESERVED_OPS)"
        )
    if node.op == "get_attr":
        try:
            value = program.get_constant(node.target)
        except AttributeError:
            raise VerificationError(f"{describe_node(node)}: attribute '{node.target}' does not exist") from None
        if not isinstance(value, torch.Tensor):
            raise VerificationError(f"{describe_node(node)}: attribute '{node.target}' is not a tensor")
    returns_nothing = isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.returns
    if node.op in ("placeholder", "get_attr", "call_function") and "val" not in node.meta and not returns_nothing:
        raise VerificationError(f"{describe_node(node)}: missing meta['val'] (shape/dtype)")


def _verify_meta(program: Program) -> None:
    gm = program.graph_module
    stored = {node: node.meta.get("val") for node in gm.graph.nodes if node.op != "output"}
    try:
        propagate_meta(gm)
        for node, old in stored.items():
            new = node.meta.get("val")
            if _signature(old) != _signature(new):
                raise VerificationError(
                    f"{describe_node(node)}: stored metadata {tensor_summary(old)} disagrees with "
                    f"propagated {tensor_summary(new)}; call fxopt.ir.propagate_meta after rewriting"
                )
    except VerificationError:
        raise
    except Exception as exc:
        raise VerificationError(f"{program.name}: shape propagation failed: {exc}") from None
    finally:
        for node, old in stored.items():
            if old is not None:
                node.meta["val"] = old


def _signature(val: object) -> object:
    if isinstance(val, torch.Tensor):
        return (tuple(str(d) for d in val.shape), val.dtype)
    if isinstance(val, (tuple, list)):
        return tuple(_signature(v) for v in val)
    if isinstance(val, torch.SymInt):
        return "symint"
    return type(val).__name__
