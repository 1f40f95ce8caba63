"""``torch.compile(model, backend="fxopt", options={...})``: fxopt as a TorchDynamo backend.

``torch.export`` needs the whole model as one graph and refuses data-dependent control flow and calls it cannot
trace. Dynamo runs such a model's Python as usual, splits it at those graph breaks, and hands each graph it
captured to a backend: here each one is optimized and built as :func:`fxopt.optimize` would a whole model.
``options`` are ``optimize``'s keyword arguments (``target``, ``pipeline``, ``verify``, ``dispatch``, ``tune``,
``calibration``). Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``).

Dynamo passes the model's parameters and buffers to each graph as inputs; fxopt takes them as constants (the
weights are frozen when a graph is compiled, as Inductor's ``freezing`` does), so that folding and fusing see
them. Inference only, like :func:`fxopt.optimize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fxopt.errors import FxoptError

__all__ = ["fxopt_backend"]

_OPTIONS = {"target", "pipeline", "verify", "dispatch", "tune", "calibration"}
_log = logging.getLogger("fxopt")


def fxopt_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """Optimize and build one graph Dynamo captured; its example inputs fix the shapes it is built for."""
    from fxopt.api import optimize

    options = dict(options or {})
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise FxoptError(
            f"torch.compile(backend='fxopt'): unknown option {', '.join(map(repr, unknown))} "
            f"(options: {', '.join(sorted(_OPTIONS))})"
        )
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        # Dynamo marks a dimension dynamic after it changed between calls: fxopt builds static shapes only.
        _log.warning(
            "torch.compile(backend='fxopt'): a graph with symbolic sizes runs in PyTorch "
            "(compile with dynamic=False to build one per shape)"
        )
        return gm.forward
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {i: (node.name, example_inputs[i]) for i, node in enumerate(placeholders) if _is_weight(node)}
    inputs = tuple(x for i, x in enumerate(example_inputs) if i not in weights)
    # Outside Dynamo's tracing context: its fake-tensor mode would be taken for fxopt's own shape propagation.
    with torch._guards.tracing(None):
        optimized = optimize(_Frozen(gm, weights, len(placeholders)), inputs, **options)
        optimized.build(inputs, {})  # built now, while Dynamo compiles, not at the first call

    def run(*args):
        return optimized(*(x for i, x in enumerate(args) if i not in weights))

    return run


def _is_weight(placeholder: torch.fx.Node) -> bool:
    """Whether Dynamo's input is a module's parameter or buffer (its source: ``L['self']._parameters['w']``)."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    return source is not None and ("._parameters[" in source.name or "._buffers[" in source.name)


class _Frozen(torch.nn.Module):
    """``gm`` with the inputs at ``weights`` fixed to those tensors, held as buffers: constants to capture."""

    def __init__(self, gm: torch.fx.GraphModule, weights: dict[int, tuple[str, torch.Tensor]], count: int):
        super().__init__()
        self.gm, self.count, self.names = gm, count, {i: name for i, (name, _) in weights.items()}
        for name, value in weights.values():
            self.register_buffer(name, value.detach())

    def forward(self, *inputs):
        given = iter(inputs)
        return self.gm(*(getattr(self, self.names[i]) if i in self.names else next(given) for i in range(self.count)))
