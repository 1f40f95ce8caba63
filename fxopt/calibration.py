"""Calibration data: a few representative inputs that data-driven passes run the program on.

Pruning (activation and Taylor importance) and quantization (observers)
share this one mechanism: ``optimize(..., calibration=data)``, a
``[calibration]`` table in a pipeline file, or ``--calibration FILE`` on the
command line. Statistics are gathered by :func:`observe`, which streams the
batches through the graph and hands each watched value to a callback, so
memory stays bounded by one batch plus whatever the callbacks keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import FxoptError, InputMismatchError, PassError, PipelineError
from fxopt.ir.numerics import relative_rms_error
from fxopt.ir.program import Program
from fxopt.ir.traits import BATCH_NORM

__all__ = ["Calibration", "observe", "watching", "gradients", "data_nodes", "model_outputs", "output_error"]

Loss = Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    """Calibration batches, each called like the model (a tensor, a tuple of arguments, or ``(args, kwargs)``).

    ``loss`` maps the model's outputs on a batch to a scalar; data-driven
    passes that need gradients (Taylor importance) differentiate it. Without
    one they use half the squared norm of the floating outputs, a label-free
    proxy for how much the output depends on each weight.

    ``metric(outputs, reference)`` scores a changed model (``quantize{scheme=mixed}``,
    sensitivity reports): its outputs on every batch against the original's,
    as lists with one model output per batch; lower is better (an error, or an
    accuracy drop). Without one: the relative RMS error of the floating outputs.
    """

    batches: tuple
    loss: Loss | None = None
    source: str = "calibration data"
    metric: Callable[[list, list], float] | None = None

    @staticmethod
    def coerce(
        data: object, *, limit: int | None = None, loss: Loss | None = None, base: Path | None = None
    ) -> Calibration | None:
        """Accept a :class:`Calibration`, an iterable of batches, a ``.pt`` file of them, or a ``[calibration]`` table.

        A ``.pt`` file holds a list of batches, or one tensor whose first
        dimension is split into batches of the model's batch size. A table has
        ``data`` (the file, relative to ``base``) and optionally ``batches``
        (use at most that many).
        """
        if data is None:
            return None
        if isinstance(data, Calibration):
            return data
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {"data", "batches"})
            if unknown or "data" not in data:
                raise PipelineError(
                    f"[calibration] takes 'data' (a .pt file) and optionally 'batches'; "
                    f"got {', '.join(sorted(data)) or 'nothing'}"
                )
            limit = data.get("batches", limit)
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise PipelineError(f"[calibration] batches must be a positive integer, got {limit!r}")
            path = Path(data["data"])
            return Calibration.coerce(base / path if base and not path.is_absolute() else path, limit=limit, loss=loss)
        source = "calibration data"
        if isinstance(data, (str, Path)):
            source = str(data)
            try:
                data = torch.load(data, weights_only=True)
            except OSError as exc:
                raise FxoptError(f"cannot read calibration file {source}: {exc.strerror}") from None
            except Exception as exc:  # whatever else the file holds: text, nothing, a truncated or foreign pickle
                what = "it is empty" if Path(source).stat().st_size == 0 else f"{type(exc).__name__} reading it"
                raise FxoptError(
                    f"calibration file {source} is not a torch.save'd list of tensor batches ({what})"
                ) from None
        if isinstance(data, torch.Tensor):
            data = [data]
        if not isinstance(data, Iterable):
            raise FxoptError(
                f"calibration data must be an iterable of model inputs or a .pt file, got {type(data).__name__}"
            )
        batches: list = []
        for batch in data:
            if limit is not None and len(batches) >= limit:
                break
            batches.append(batch)
        if not batches:
            raise FxoptError(f"{source} holds no batches")
        return Calibration(tuple(batches), loss, source)

    def flat_batches(self, program: Program) -> Iterator[list]:
        """Each batch flattened to the program's placeholders (shapes and dtypes checked)."""
        for index, batch in enumerate(self.batches):
            for args, kwargs in self._calls(program, batch):
                try:
                    yield program.flatten_inputs(args, kwargs)
                except InputMismatchError as exc:
                    raise InputMismatchError(f"{self.source}, batch {index}: {exc}") from None

    def __len__(self) -> int:
        return len(self.batches)

    @staticmethod
    def _calls(program: Program, batch: object) -> Iterator[tuple[tuple, dict]]:
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict):
            yield tuple(batch[0]), batch[1]
            return
        args = batch if isinstance(batch, (tuple, list)) else (batch,)
        placeholders = program.placeholders()
        expected = placeholders[0].meta.get("val") if len(placeholders) == 1 else None
        if (
            len(args) == 1
            and isinstance(args[0], torch.Tensor)
            and isinstance(expected, torch.Tensor)
            and args[0].dim() == expected.dim()
            and isinstance(expected.shape[0], int)
            and args[0].shape[1:] == expected.shape[1:]
            and args[0].shape[0] % expected.shape[0] == 0
        ):
            # A stack of samples: batches of the size the model was captured with.
            for chunk in args[0].split(expected.shape[0]):
                yield (chunk,), {}
            return
        yield tuple(args), {}


def model_outputs(program: Program, calibration: Calibration, batches: Callable[[int], bool] | None = None) -> list:
    """The program's outputs on the calibration batches (those whose index ``batches`` picks), one per batch."""
    with torch.no_grad():
        return [
            pytree.tree_unflatten(list(program.graph_module(*flat)), program.out_spec)
            for index, flat in enumerate(calibration.flat_batches(program))
            if batches is None or batches(index)
        ]


def output_error(calibration: Calibration, outputs: list, reference: list, what: str) -> float:
    """How far ``outputs`` are from ``reference`` (both from :func:`model_outputs`): the calibration's metric, else
    the relative RMS error; ``what`` (the pass asking) is named if the metric returns something else than a number."""
    value = (calibration.metric or relative_rms_error)(outputs, reference)
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise PassError(
            f"{what}: the calibration metric must return a number (lower is better), got {type(value).__name__}"
        ) from None


def data_nodes(program: Program) -> set[fx.Node]:
    """Nodes whose value depends on an input (activations), as opposed to weights and what is computed from them."""
    found: set[fx.Node] = set()
    for node in program.graph.nodes:
        if node.op == "placeholder" or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def observe(
    program: Program,
    calibration: Calibration,
    watch: Mapping[fx.Node, Callable[[torch.Tensor], None]],
    progress: Callable[[str], None] | None = None,
    what: str = "statistics",
) -> None:
    """Run every calibration batch through ``program``, calling ``watch[node](value)`` as each watched value is made.

    After each batch ``progress`` (a pass's ``ctx.progress``) gets "calibration <what>: batch 3/8".
    """

    class Watcher(fx.Interpreter):
        def run_node(self, n: fx.Node):
            result = super().run_node(n)
            if n in watch:
                watch[n](result)
            return result

    batches = list(calibration.flat_batches(program))  # views of the batches already held: counted, not copied
    with torch.no_grad():
        for done, flat in enumerate(batches, 1):
            Watcher(program.graph_module).run(*flat)
            if progress:
                progress(f"calibration {what}: batch {done}/{len(batches)}")


def watching(
    callbacks: Iterable[tuple[fx.Node, Callable[[torch.Tensor], None]]],
) -> dict[fx.Node, Callable[[torch.Tensor], None]]:
    """An :func:`observe` watch from ``(node, callback)`` pairs: several callbacks on one node are each called."""
    by_node: dict[fx.Node, list[Callable[[torch.Tensor], None]]] = {}
    for node, callback in callbacks:
        by_node.setdefault(node, []).append(callback)

    def calling(functions: list[Callable[[torch.Tensor], None]]) -> Callable[[torch.Tensor], None]:
        def call(value: torch.Tensor) -> None:
            for function in functions:
                function(value)

        return call

    return {node: calling(functions) for node, functions in by_node.items()}


def gradients(
    program: Program,
    calibration: Calibration,
    targets: Iterable[str],
    accumulate: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> None:
    """Differentiate the calibration loss on every batch; ``accumulate(target, weight, grad)`` per constant and batch.

    Batch norms' running statistics are left out (aten cannot differentiate
    them; they are not weights).
    """
    statistics = {
        a.target for n in program.graph.nodes if n.target is BATCH_NORM for a in n.args[3:5] if isinstance(a, fx.Node)
    }  # running mean and variance: not differentiable
    targets = {t for t in targets if t not in statistics and program.get_constant(t).is_floating_point()}
    leaves = {t: program.get_constant(t).detach().clone().requires_grad_() for t in targets}
    if not leaves:  # nothing to differentiate (a model with no prunable group): autograd refuses no inputs
        return

    class WithLeaves(fx.Interpreter):
        def get_attr(self, target, args, kwargs):
            return leaves[target] if target in leaves else super().get_attr(target, args, kwargs)

    loss_fn = calibration.loss or _output_energy
    for flat in calibration.flat_batches(program):
        with torch.enable_grad():
            flat_out = WithLeaves(program.graph_module).run(*flat)
            outputs = pytree.tree_unflatten(list(flat_out), program.out_spec)
            loss = loss_fn(outputs)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise FxoptError("the calibration loss must return a scalar tensor")
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (target, weight), grad in zip(leaves.items(), grads):
            if grad is not None:
                accumulate(target, weight.detach(), grad)


def _output_energy(outputs: object) -> torch.Tensor:
    tensors = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise FxoptError("the model has no floating outputs to differentiate; give Calibration(loss=...)")
    return torch.stack([0.5 * t.float().pow(2).mean() for t in tensors]).sum()
