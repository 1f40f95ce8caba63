"""Capture a PyTorch model into fxopt's IR with ``torch.export``."""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from fxopt.errors import CaptureError
from fxopt.ir.canonical import decomposition_table
from fxopt.ir.meta import TORCH_DIR
from fxopt.ir.program import Program, attribute_owner
from fxopt.log import native_stderr_to_debug, quiet_loggers

__all__ = ["capture"]

_FXOPT_DIR = os.path.dirname(os.path.dirname(__file__))


def capture(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    example_kwargs: dict | None = None,
    *,
    dynamic_shapes: dict | tuple | None = None,
    strict: bool = False,
) -> Program:
    """Trace ``model`` into a :class:`~fxopt.ir.Program` of canonical ATen ops.

    Parameters
    ----------
    model:
        The model. It is captured in eval mode (its training flags are restored
        afterwards) and never modified.
    example_inputs, example_kwargs:
        Positional and keyword arguments of one representative call; any pytree
        of tensors (tuples, lists, dicts). A single tensor is taken as ``(tensor,)``.
    dynamic_shapes:
        Passed to ``torch.export.export`` to keep dimensions symbolic.
    strict:
        Use TorchDynamo's strict tracing instead of the default non-strict export.

    Raises
    ------
    CaptureError
        When export fails; the message names the model's module and source line
        where tracing stopped, and what to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture expects a torch.nn.Module, got {type(model).__name__}; wrap a plain function "
            f"in a Module whose forward calls it"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    name = type(model).__name__
    with eval_mode(model):
        try:
            # Export logs and prints whole graphs before the errors capture turns into one line.
            with quiet_loggers("torch.fx.experimental.symbolic_shapes"), native_stderr_to_debug("torch.export"):
                exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:  # export raises many unrelated types; all mean "cannot capture"
            raise CaptureError(_explain_export_failure(model, exc, strict)) from exc
    exported = exported.run_decompositions(decomposition_table())
    _reject_mutations(name, exported)  # mutations become visible in the signature once functionalized

    unlifted = exported.module()
    graph = copy.deepcopy(unlifted.graph)
    for node in list(graph.nodes):
        # Export's input guards are re-checked by Program.flatten_inputs with clearer errors;
        # dtype assertions on intermediates were proven while tracing and only block rewrites.
        if node.op == "call_module" or node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph.set_codegen(fx.graph.CodeGen())  # flat inputs and a flat output tuple; Program owns the pytrees
    graph.eliminate_dead_code()  # before building the module, so constants nothing reads are not copied
    gm = fx.GraphModule(unlifted, graph, class_name=f"{name}Graph")
    _own_constants(gm)
    gm.recompile()
    flat_inputs = fx_pytree.tree_flatten_spec((args, kwargs), exported.call_spec.in_spec)
    program = Program(gm, exported.call_spec.in_spec, exported.call_spec.out_spec, flat_inputs, name)

    from fxopt.ir.verify import verify  # verify imports Program; imported late to keep modules acyclic

    verify(program, check_meta=False)  # export propagated every value itself, and nothing here rewrote an op
    return program


def _own_constants(gm: fx.GraphModule) -> None:
    """Give the graph module its own tensor objects, sharing storage with the model's.

    ``Module.to()`` and similar rebind ``param.data`` in place; with shared
    Parameter objects that would move or convert the user's model too.
    """
    for name, param in list(gm.named_parameters()):
        module, attr = attribute_owner(gm, name)
        setattr(module, attr, torch.nn.Parameter(param.detach(), requires_grad=param.requires_grad))
    for name, buffer in list(gm.named_buffers()):
        module, attr = attribute_owner(gm, name)
        module.register_buffer(attr, buffer.detach())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _reject_mutations(name: str, exported: torch.export.ExportedProgram) -> None:
    signature = exported.graph_signature
    mutated = list(signature.buffers_to_mutate.values()) + list(signature.user_inputs_to_mutate.values())
    if mutated:
        raise CaptureError(
            f"{name}.forward mutates {', '.join(repr(m) for m in mutated)} in place even in eval mode; "
            f"fxopt optimizes pure inference graphs: move the state update out of forward"
        )


def _explain_export_failure(model: torch.nn.Module, exc: Exception, strict: bool) -> str:
    """Point at the user's module and line where export stopped, and suggest a remedy."""
    module_names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = None
    module = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if _is_model_code(frame.f_code.co_filename):
            where = f"{frame.f_code.co_filename}:{tb.tb_lineno} in {frame.f_code.co_name}"
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and id(owner) in module_names:
                module = f"{module_names[id(owner)]} ({type(owner).__name__})"
        tb = tb.tb_next
    if where is None:
        # Dynamo (strict) keeps the user frame in the message, not the traceback.
        user_frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_model_code(f.filename)]
        if user_frames:
            where = f"{user_frames[-1].filename}:{user_frames[-1].lineno}"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = f"cannot capture {type(model).__name__}"
    if module:
        text += f": module {module}"
    if where:
        text += f" at {where}"
    text += f": {type(exc).__name__}: {reason}. " + _remedy(exc, strict)
    return text


def _is_model_code(filename: str) -> bool:
    # "<string>" and similar are code torch generates while tracing, not the model's.
    return not (filename.startswith((TORCH_DIR, "<")) or filename.startswith(_FXOPT_DIR))


def _remedy(exc: Exception, strict: bool) -> str:
    message = str(exc)
    if "register a pytree" in message:
        return (
            "The model takes or returns an object export cannot flatten; return tensors (or tuples/dicts "
            "of them), or register the type with torch.utils._pytree.register_pytree_node. For "
            "transformers models, config.use_cache=False avoids returning cache objects."
        )
    if "data-dependent" in message or "GuardOnDataDependent" in type(exc).__name__:
        return (
            "The forward branches on tensor values; rewrite the branch with torch.where or "
            "torch.cond, or move it out of the model."
        )
    if "Constraints violated" in message or "dynamic" in message.lower() and "shape" in message.lower():
        return "A dimension marked dynamic was specialized; relax dynamic_shapes for it or capture with static shapes."
    if strict:
        return "Try strict=False (non-strict export traces Python the way eager mode runs it)."
    return (
        "Check that the example inputs are valid for the model (run it eagerly on them), or simplify the failing line."
    )
