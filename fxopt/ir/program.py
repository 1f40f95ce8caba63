"""The captured model: a flat ATen graph plus the calling convention of the original model."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from fxopt.errors import InputMismatchError
from fxopt.ir.printer import format_program

__all__ = ["Program", "attribute_owner", "describe_structure", "describe_arguments"]


def attribute_owner(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding the dotted attribute ``target``, and the attribute's own name."""
    owner, _, attr = target.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class Program(torch.nn.Module):
    """fxopt's IR: a ``torch.fx.GraphModule`` over canonical ATen ops, callable like the model.

    ``graph_module`` takes the flattened inputs and returns a flat tuple of
    outputs; parameters and buffers are attributes of it (``get_attr`` nodes),
    not inputs. ``forward`` flattens the caller's pytree of arguments with
    ``in_spec`` and rebuilds the model's output structure with ``out_spec``, so
    a ``Program`` is called exactly like the model it was captured from.

    Passes rewrite ``graph_module`` and must never write into the storage of
    its constants (they register new tensors instead), because constants share
    storage with the user's model.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        in_spec: pytree.TreeSpec,
        out_spec: pytree.TreeSpec,
        example_inputs: tuple,
        name: str = "model",
    ):
        super().__init__()
        self.graph_module = graph_module
        self.in_spec = in_spec
        self.out_spec = out_spec
        # Flat example inputs, kept for numeric verification; a plain tuple so
        # they are not part of the state dict.
        self.example_inputs = tuple(example_inputs)
        self.name = name

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def forward(self, *args, **kwargs):
        flat = self.flatten_inputs(args, kwargs)
        return pytree.tree_unflatten(list(self.graph_module(*flat)), self.out_spec)

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list:
        """Flatten call arguments to the graph's placeholders, checking shapes and dtypes."""
        try:
            if len(args) != self.in_spec.child(0).num_children:  # tree_flatten_spec ignores extra arguments
                raise ValueError
            flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        except Exception:
            raise InputMismatchError(
                f"{self.name}: {describe_arguments(args, kwargs)}, but it was captured with "
                f"{describe_structure(self.in_spec)}"
            ) from None
        for placeholder, value in zip(self.placeholders(), flat):
            expected = placeholder.meta.get("val")
            if isinstance(expected, torch.Tensor):
                _check_tensor(self.name, placeholder.name, expected, value)
        return flat

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def output_nodes(self) -> list:
        """The flat list of output values (nodes or constants) of the graph."""
        (outputs,) = self.graph.output_node().args
        return list(outputs)

    def constants(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(qualified name, tensor)`` of every parameter and buffer a ``get_attr`` reads."""
        for node in self.graph.nodes:
            if node.op == "get_attr":
                value = self.get_constant(node.target)
                if isinstance(value, torch.Tensor):
                    yield node.target, value

    def get_constant(self, target: str):
        return getattr(*attribute_owner(self.graph_module, target))

    def clone(self) -> Program:
        """A copy whose graph can be rewritten freely; constant tensors are shared, not copied."""
        graph = copy.deepcopy(self.graph)
        gm = fx.GraphModule(self.graph_module, graph, class_name=type(self.graph_module).__name__)
        gm.meta = dict(self.graph_module.meta)
        return Program(gm, self.in_spec, self.out_spec, self.example_inputs, self.name)

    def run_flat(self, flat_inputs=None) -> tuple:
        """Run the graph on flat inputs (the example inputs by default), without grad."""
        with torch.no_grad():
            return tuple(self.graph_module(*(self.example_inputs if flat_inputs is None else flat_inputs)))

    def __str__(self) -> str:
        return format_program(self)


def _check_tensor(model: str, name: str, expected: torch.Tensor, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputMismatchError(f"{model}: input '{name}' must be a tensor, got {type(value).__name__}")
    if value.dtype != expected.dtype:
        raise InputMismatchError(
            f"{model}: input '{name}' has dtype {value.dtype}, the model was captured with {expected.dtype}"
        )
    static = [d if isinstance(d, int) else None for d in expected.shape]
    if value.dim() != len(static) or any(s is not None and s != v for s, v in zip(static, value.shape)):
        shown = "x".join("?" if s is None else str(s) for s in static)
        raise InputMismatchError(
            f"{model}: input '{name}' has shape {'x'.join(map(str, value.shape))}, the model was "
            f"captured for {shown}; capture again with these shapes or mark the dimension dynamic "
            f"(dynamic_shapes=...)"
        )


def describe_structure(in_spec: pytree.TreeSpec) -> str:
    """The call structure ``(args, kwargs)`` a spec flattens: ``1 positional argument and keyword 'mask'``."""
    args_spec, kwargs_spec = in_spec.children() if in_spec.num_children == 2 else (in_spec, None)
    keywords = list(kwargs_spec.context) if kwargs_spec is not None and kwargs_spec.context else []
    text = _count(args_spec.num_children, "positional argument")
    return text + (f" and keyword{'s' * (len(keywords) > 1)} {', '.join(map(repr, keywords))}" if keywords else "")


def describe_arguments(args: tuple, kwargs: dict) -> str:
    """What a call passed, in the words of :func:`describe_structure`: ``called with 2 positional arguments``."""
    text = f"called with {_count(len(args), 'positional argument')}"
    return text + (f" and keyword{'s' * (len(kwargs) > 1)} {', '.join(map(repr, kwargs))}" if kwargs else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"
