"""A readable text form of a :class:`~fxopt.ir.Program`, for dumps and debugging."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from fxopt.ir.meta import module_path, source_location, tensor_summary

if TYPE_CHECKING:
    from fxopt.ir.program import Program

__all__ = ["format_program"]


def format_program(program: Program, *, locations: bool = True) -> str:
    """Return the program as text, one node a line.

    ``%conv : f32[1,8,14,14] = aten.convolution(%x, %c_weight, ...)  # model.py:12 (c Conv2d)``.
    Nodes a pass created show ``[pass-name]`` after the op.
    """
    lines = [f"program {program.name}:"]
    for node in program.graph.nodes:
        if node.op == "output":
            lines.append(f"  return ({', '.join(_arg(a) for a in node.args[0])})")
            continue
        lhs = f"  %{node.name} : {tensor_summary(node.meta.get('val'))}"
        if node.op == "placeholder":
            rhs = "input"
        elif node.op == "get_attr":
            rhs = f"constant {node.target}"
        else:
            args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
            rhs = f"{_op(node.target)}({', '.join(args)})"
        prov = node.meta.get("fxopt_provenance")
        if prov:
            rhs += f" [{prov.pass_name}]"
        note = ""
        if locations and node.op == "call_function":
            source, module = source_location(node), module_path(node)
            where = ([_short(source)] if source else []) + ([f"module {module}"] if module else [])
            if where:
                note = "  # " + ", ".join(where)
        lines.append(f"{lhs} = {rhs}{note}")
    return "\n".join(lines)


def _op(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removesuffix(".default")
    return getattr(target, "__name__", str(target))


def _arg(arg: object) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg(a) for a in arg)
        return f"[{inner}]"
    return repr(arg)


def _short(where: str) -> str:
    # Keep the file name, not the whole path: dumps stay readable.
    path, sep, rest = where.partition(":")
    return path.rsplit("/", 1)[-1] + sep + rest
