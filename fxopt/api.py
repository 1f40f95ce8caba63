"""``fxopt.optimize``: capture, run a pipeline, build for a target."""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

import torch
import torch.utils._pytree as pytree

from fxopt.codegen import Dispatch, Executable, block_costs, build
from fxopt.codegen.isa import Isa
from fxopt.codegen.tune import TuneOptions
from fxopt.codegen.tuning_database import BLOCKS_FILE, existing_database
from fxopt.errors import FxoptError, InputMismatchError, VerificationError
from fxopt.ir.capture import capture, eval_mode
from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.ir.program import describe_arguments
from fxopt.passes.base import Pass
from fxopt.passes.convert_layout import ConvertLayout
from fxopt.passes.manager import PassManager
from fxopt.passes.pipeline import Pipeline, VerifyMode
from fxopt.report import Report
from fxopt.targets import Target, parse_target

__all__ = ["optimize", "OptimizedModel"]


def optimize(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    example_kwargs: dict | None = None,
    target: str | Target | None = None,
    pipeline: str | Path | Sequence[Pass] | Pipeline | None = None,
    verify: VerifyMode | None = None,
    tolerance: Tolerance | None = None,
    dynamic_shapes: dict | tuple | None = None,
    strict: bool = False,
    print_ir_after: Sequence[str] = (),
    dump_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    tune: bool | int | str | TuneOptions | None = None,
    dispatch: Dispatch = "measure",
    calibration: object = None,
) -> OptimizedModel:
    """Optimize ``model`` for ``target``; the result is called like the model.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``; it is captured in eval mode and never modified.
    example_inputs, example_kwargs:
        A representative call. Given, everything happens now; omitted, the model
        is captured and built on its first call and again for each new input
        signature (shapes, dtypes, structure), like ``torch.compile``.
    target:
        ``"cpu"``, ``"cuda"``, ``"cuda:sm_90"``, ``"aarch64"`` or ``"torch"``;
        default: the pipeline file's ``[target]``, else ``"cpu"``.
        ``report()`` says which backend actually runs.
    pipeline:
        A spec string (``"fold-constants,dce"``), a named pipeline, a TOML file
        path, a list of passes, or a :class:`Pipeline`. Default: the target's
        default pipeline (or the pipeline file's ``[target]``).
    verify:
        ``"end"`` (default) compares the optimized outputs with the original
        model's on the example inputs and, on failure, names the first pass and
        node responsible; ``"each"`` checks after every pass; ``"off"`` skips
        the numeric check (the IR is still verified).
    tolerance:
        The bound outputs must meet (:class:`Tolerance`).
    print_ir_after, dump_dir:
        IR dumps: pass names, ``"all"`` or ``"change"``; written to ``dump_dir``
        when given, else to stderr.
    progress:
        ``progress(index, total, step)`` called before each step (passes,
        tuning rounds with the best latency so far, dispatch measurements).
    tune:
        TVM targets: tune kernels with MetaSchedule before building. ``True``
        (the target's default trials per kernel), a trial count (``500``), a
        duration (``"10m"``), or :class:`~fxopt.codegen.tune.TuneOptions`
        (database path, remote devices). Results persist in the target's
        database, so a second run reuses them; so do ``convert-layout``'s
        blocks, searched with the convolution times tuning measured per
        block from the next build on. Default: untuned kernels.
    dispatch:
        ``"measure"`` (default) runs each segment in TVM only where it is
        measured faster than PyTorch, so the result is never slower than the
        optimized graph in PyTorch; ``"tvm"`` uses TVM wherever it lowers;
        ``"torch"`` runs everything in PyTorch. ``report()`` shows, per
        segment, the backend chosen and both timings.
    calibration:
        Representative inputs for data-driven passes (pruning by activation or
        Taylor importance, quantization): an iterable of batches called like the
        model, a ``.pt`` file of them, or a :class:`~fxopt.calibration.Calibration`
        (which may carry a loss). Overrides the pipeline file's ``[calibration]``.

    Raises
    ------
    CaptureError, PipelineError, PassError, VerificationError
        With the culprit named; see :mod:`fxopt.errors`.
    """
    if not isinstance(model, torch.nn.Module):
        raise FxoptError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if dispatch not in get_args(Dispatch):
        raise FxoptError(f"dispatch={dispatch!r}: use one of {', '.join(map(repr, get_args(Dispatch)))}")
    resolved = Pipeline.coerce(pipeline) if pipeline is not None else None
    target = parse_target(target or (resolved.target if resolved else None) or "cpu")
    if resolved is None:
        resolved = Pipeline.coerce(target.default_pipeline)
    tune_options = TuneOptions.coerce(tune)
    manager = PassManager(
        _blocked_for(resolved, target, tune_options.database if tune_options else None),
        verify=verify,
        tolerance=tolerance,
        print_ir_after=print_ir_after,
        dump_dir=dump_dir,
        progress=progress,
        calibration=calibration,
    )
    manager.check_calibration()  # before minutes of capture and passes
    optimized = OptimizedModel(
        model,
        target,
        manager,
        dynamic_shapes=dynamic_shapes,
        strict=strict,
        tune=tune_options,
        dispatch=dispatch,
    )
    if example_inputs is not None or example_kwargs:
        args = () if example_inputs is None else example_inputs
        optimized.build(args if isinstance(args, tuple) else (args,), dict(example_kwargs or {}))
    return optimized


def _blocked_for(pipeline: Pipeline, target: Target, database_override: Path | None) -> Pipeline:
    """``pipeline`` with its ``convert-layout`` blocking for ``target``'s vectors where it names none (its
    ``lanes=0`` reads the host's: an AVX2 build on an AVX-512 host got blocks of 16, which its int8 kernels,
    8 lanes wide, do not take) and given the convolution times per block pair tuning stored for ``target``
    (:mod:`fxopt.codegen.block_costs`; in ``database_override`` if given), where there are some and the pipeline
    names no file itself."""
    if target.kind != "llvm" or not any(isinstance(p, ConvertLayout) for p in pipeline.passes):
        return pipeline
    database = database_override or existing_database(target)
    costs = str(database / BLOCKS_FILE) if database is not None and block_costs.load(database) else ""
    lanes = Isa.of(target).lanes()

    def for_target(p: Pass) -> Pass:
        if not isinstance(p, ConvertLayout):
            return p
        return dataclasses.replace(p, lanes=p.lanes or lanes, block_costs=p.block_costs or costs)

    return dataclasses.replace(pipeline, passes=tuple(map(for_target, pipeline.passes)))


class OptimizedModel(torch.nn.Module):
    """The result of :func:`optimize`: call it like the original model (inference, no autograd).

    ``graph_module`` is the optimized ATen-level ``torch.fx.GraphModule`` and
    ``report()`` the per-pass table of the most recent build. One build is
    cached per input signature.
    """

    def __init__(
        self,
        model,
        target: Target,
        manager: PassManager,
        *,
        dynamic_shapes=None,
        strict=False,
        tune: TuneOptions | None = None,
        dispatch: Dispatch = "measure",
    ):
        super().__init__()
        # Held outside the Module tree: the original's parameters are not this module's.
        self.__dict__["_model"] = model
        self.target = target
        self.manager = manager
        self._dynamic_shapes = dynamic_shapes
        self._strict = strict
        self._tune = tune
        self._dispatch = dispatch
        self._builds: dict[str, tuple[Executable, Report]] = {}
        self._last: tuple[Executable, Report] | None = None

    def forward(self, *args, **kwargs):
        key = _signature(args, kwargs)
        built = self._builds.get(key)
        if built is None:
            built = self.build(args, kwargs)
        self._last = built
        return built[0](*args, **kwargs)

    def build(self, args: tuple, kwargs: dict) -> tuple[Executable, Report]:
        """Capture, optimize and build for this input signature (done by the first call otherwise)."""
        model = self.__dict__["_model"]
        _check_call(model, args, kwargs)
        progress = self.manager.progress
        if progress:
            progress(0, 1, "capture")
        start = time.perf_counter()
        program = capture(model, args, kwargs, dynamic_shapes=self._dynamic_shapes, strict=self._strict)
        capture_seconds = time.perf_counter() - start
        with eval_mode(model), torch.no_grad():
            reference = tuple(pytree.tree_leaves(model(*args, **kwargs)))
        capture_error = None
        if self.manager.verify != "off":
            worst_abs, worst_rel, failing = compare_outputs(program.run_flat(), reference, self.manager.tolerance)
            capture_error = (worst_abs, worst_rel)
            if failing is not None:
                raise VerificationError(
                    f"the captured graph of {program.name} differs from the model at output {failing} "
                    f"(max abs error {worst_abs:.3g}); the model may be nondeterministic or depend on "
                    f"global state that export specialized"
                )
        optimized, records = self.manager.run(program, reference)
        start = time.perf_counter()
        executable = build(
            optimized,
            self.target,
            dispatch=self._dispatch,
            tolerance=self.manager.tolerance,
            tune=self._tune,
            progress=progress,
        )
        build_seconds = time.perf_counter() - start
        build_error = None
        if self.manager.verify != "off" and executable.module is not optimized:
            outputs = pytree.tree_leaves(executable(*args, **kwargs))
            outputs = [o.cpu() if isinstance(o, torch.Tensor) else o for o in outputs]
            build_error = compare_outputs(outputs, reference, self.manager.tolerance)[:2]
            # The build must reproduce the optimized graph; after a lossy pass that is not the model itself.
            lossy = any(not p.exact for p in self.manager.pipeline.passes)
            expected = optimized.run_flat() if lossy else reference
            worst_abs, _, failing = compare_outputs(
                outputs, expected, self.manager.tolerance, allowance=_flip_allowance(optimized, expected, reference)
            )
            if failing is not None:
                raise VerificationError(
                    f"the {executable.backend} build of {program.name} for target '{self.target}' differs from the "
                    f"{'optimized graph' if lossy else 'model'} at output {failing} (max abs error {worst_abs:.3g}); "
                    f"build with dispatch='torch' to "
                    f"isolate the backend"
                )
        report = Report(
            model=program.name,
            target=str(self.target),
            backend=executable.backend,
            backend_note=executable.note,
            pipeline=str(self.manager.pipeline),
            verify=self.manager.verify,
            capture_seconds=capture_seconds,
            capture_error=capture_error,
            passes=records,
            build_seconds=build_seconds,
            build_error=build_error,
            segments=executable.segments,
            fallbacks=executable.fallbacks,
            tuning=str(executable.tuning) if executable.tuning else "",
            latency=executable.latency,
        )
        built = (executable, report)
        self._builds[_signature(args, kwargs)] = built
        self._last = built
        return built

    def _latest(self) -> tuple[Executable, Report]:
        if self._last is None:
            raise FxoptError("nothing is built yet: call the model once or pass example_inputs to optimize()")
        return self._last

    @property
    def executable(self) -> Executable:
        """The most recent build: what runs (``executable.module``), its segments and kernels."""
        return self._latest()[0]

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The optimized ATen-level graph of the most recent build."""
        return self._latest()[0].program.graph_module

    @property
    def program(self):
        """The optimized :class:`~fxopt.ir.Program` of the most recent build."""
        return self._latest()[0].program

    def report(self) -> Report:
        """The per-pass report of the most recent build."""
        return self._latest()[1]

    def kernel_source(self, fmt: str | None = None) -> str:
        """The kernels the most recent build generated: CUDA C for CUDA targets, LLVM IR or (``fmt="asm"``)
        assembly for CPU."""
        return self._latest()[0].kernel_source(fmt)

    def export(self, path: str | Path, weights: bool = True) -> Path:
        """Write a deployable TVM library (+ manifest) of the whole optimized graph; load it with :func:`fxopt.load`.
        ``weights=False``: kernels only, the weights passed to ``load`` (:func:`fxopt.program_weights`)."""
        return self._latest()[0].export(path, weights)

    def save(self, path: str | Path) -> Path:
        """Write the optimized graph as a ``torch.export`` archive (``.pt2``), loadable with ``torch.export.load``."""
        program = self.program
        args, kwargs = pytree.tree_unflatten(list(program.example_inputs), program.in_spec)
        exported = torch.export.export(program, tuple(args), dict(kwargs), strict=False)
        path = Path(path)
        torch.export.save(exported, path)
        return path


def _flip_allowance(program, expected: Sequence, reference: Sequence) -> list[float] | None:
    """How far a build of a quantized ``program`` may stray from it: as far as quantization moved the outputs.

    A last-bit difference in a float (TVM's layer norm, GELU) before a ``quantize`` can round one activation to
    the neighbouring step (an int8 one, or a bfloat16 one before ``linear_bf16``), and the next layers carry that
    on: in a 12-layer BERT the outputs moved 0.08 that way while each segment matched. Such flips change a few
    values by one step, where quantization itself moved every value by up to half a step, so the outputs' own
    quantization error (the quantized graph against the float model on the same inputs) bounds them. A wrong
    kernel moves the outputs far further.
    """
    rounding = (torch.ops.fxopt.quantize.default, torch.ops.fxopt.linear_bf16.default)
    if not any(n.target in rounding for n in program.graph.nodes):
        return None
    allowance = []
    for out, ref in zip(expected, reference):
        floating = isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape == ref.shape
        allowance.append(float((out.double() - ref.double()).abs().max()) if floating and out.numel() else 0.0)
    return allowance


def _check_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """A call the model's ``forward`` cannot take is the caller's mistake: say so, before capturing it."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature: capture will tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputMismatchError(
            f"{type(model).__name__}.forward{signature}: {exc} ({describe_arguments(args, kwargs)})"
        ) from None


def _signature(args: tuple, kwargs: dict) -> str:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = [
        f"{tuple(leaf.shape)}:{leaf.dtype}:{leaf.device.type}" if isinstance(leaf, torch.Tensor) else repr(leaf)
        for leaf in leaves
    ]
    return f"{spec}|{'|'.join(parts)}"
