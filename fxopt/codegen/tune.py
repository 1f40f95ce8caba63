"""Tuning with a persistent, shared, crash-tolerant database per target: the configs of fxopt's kernel families
(:mod:`fxopt.codegen.kernels`, stored by :mod:`fxopt.codegen.templates`: every config of each family's space timed
per workload, the fastest kept), each convolution at the other blocks ``convert-layout`` may give it
(:mod:`fxopt.codegen.block_costs`), then MetaSchedule for the other kernels.

Each target has a database directory (``$FXOPT_CACHE_DIR/tuning/<target key>``,
default ``~/.cache/fxopt``). Tuning extracts the model's fused kernels, skips
every kernel the database already holds enough trials for, and tunes the rest
in rounds within a budget of trials or seconds, reporting the best latency so
far after each round. MetaSchedule appends each measured record to the
database as it goes, so an interrupted run keeps what it measured. Every
build that opens a database first drops lines that are not entries (half
written by a killed process, truncated, edited) and moves a database TVM
still cannot read aside, with a warning naming it: a build never fails
because of the cache. A file lock serializes processes using the same target.

Shipped records (``fxopt/codegen/records/<target key>/``, the best record per
kernel from the benchmark models' tuning, gzip-compressed; see
:func:`~fxopt.codegen.tuning_database.distill_database`) seed a new database,
so those models get tuned kernels on the reference CPU from the first run. The
database files themselves are :mod:`fxopt.codegen.tuning_database`'s.

Two workarounds for TVM 0.27 live here: builder workers use
:func:`build_candidate` (MetaSchedule's default imports
``tvm.s_tir.tensor_intrin`` in every worker, 40-60 s, so every build timed
out), and targets carry ``num-cores``, without which MetaSchedule refuses
CPU targets.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fxopt.codegen import block_costs
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels import template_workloads
from fxopt.codegen.kernels.base import KernelFamily, Workload
from fxopt.codegen.kernels.conv2d_f32 import ConvShape
from fxopt.codegen.lower_conv import conv_kernel, conv_shapes
from fxopt.codegen.templates import Choice, TemplateChoices
from fxopt.codegen.tuning_database import RECORDS_FILE, checked_database, database_dir, load_database, valid_lines
from fxopt.errors import CodegenError
from fxopt.targets import Target, host_cpu

__all__ = [
    "TuneOptions",
    "TuningSummary",
    "tune",
    "build_candidate",
    "parse_budget",
]

logger = logging.getLogger(__name__)

_ROUND = 16  # trials per round: the granularity of budgets and progress reports


@dataclass(frozen=True)
class TuneOptions:
    """How much to tune and where to measure.

    ``trials`` bounds the total number of new measurements, ``seconds`` the
    wall time (either or both; neither means the target's default trials per
    kernel). ``trials_per_kernel`` caps each kernel; kernels the database
    already holds that many trials for are not tuned again. ``rpc`` is a
    tracker ``"host:port"`` and ``device_key`` the key devices registered
    with, to measure on remote devices.
    """

    trials: int | None = None
    seconds: float | None = None
    trials_per_kernel: int | None = None
    database: Path | None = None
    rpc: str | None = None
    device_key: str | None = None

    @classmethod
    def coerce(cls, value) -> TuneOptions | None:
        """``None``/``False`` → no tuning; ``True`` → defaults; ``200`` or ``"200"`` → trials; ``"90s"``/``"5m"``
        → seconds."""
        if value is None or value is False:
            return None
        if isinstance(value, TuneOptions):
            return value
        if value is True:
            return cls()
        if isinstance(value, dict):
            return cls(**value)
        trials, seconds = parse_budget(value)
        return cls(trials=trials, seconds=seconds)


def parse_budget(value: int | str) -> tuple[int | None, float | None]:
    """``200`` → (200 trials, no time limit); ``"90s"``, ``"5m"``, ``"1h"`` → (no trial limit, seconds)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not match:
        raise CodegenError(f"tuning budget '{value}' is not a trial count (200) or a duration (90s, 5m, 1h)")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        if number != int(number) or number <= 0:
            raise CodegenError(f"tuning budget '{value}': a trial count is a positive integer")
        return int(number), None
    return None, number * {"s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class KernelTuning:
    name: str
    trials_before: int
    trials_after: int
    best_us: float | None


@dataclass
class TuningSummary:
    """What a tuning run did: per MetaSchedule kernel and per template kernel shape (:mod:`.templates`; its
    trials are the candidates timed), trials before and after and the best latency."""

    database_dir: Path
    kernels: list[KernelTuning] = field(default_factory=list)
    templates: list[KernelTuning] = field(default_factory=list)
    block_pairs: int = 0  # convolutions timed at other blocks
    seconds: float = 0.0
    stopped: str = ""  # why tuning stopped early, if it did

    @property
    def new_trials(self) -> int:
        return sum(k.trials_after - k.trials_before for k in self.kernels + self.templates)

    def __str__(self) -> str:
        tuned = sum(k.trials_after > 0 for k in self.kernels)
        count = len(self.kernels)
        timed = sum(k.trials_after > 0 for k in self.templates)
        templates = f"{timed} of {len(self.templates)} template kernels timed, " if self.templates else ""
        blocks = f"{self.block_pairs} convolution block pairs timed, " if self.block_pairs else ""
        text = (
            f"tuning: {count} kernel{'s' * (count != 1)}, {tuned} with tuned schedules, {templates}{blocks}"
            f"{self.new_trials} new trials in {self.seconds:.0f}s; database {self.database_dir}"
        )
        return text + (f" ({self.stopped})" if self.stopped else "")


def build_candidate(mod, target, _params):
    """MetaSchedule builder: TVM's default minus the ``tvm.s_tir.tensor_intrin`` import (40-60 s per worker), with
    fxopt's TIR pipeline (candidates are timed as they will run)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from fxopt.codegen.compile import register_tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=register_tir_pipeline())


def _register_intrinsics(target: Target) -> None:
    """Import only the tensor intrinsics the target can use.

    ``TuneContext`` imports all of ``tvm.s_tir.tensor_intrin``, about 65 s here
    (46 s of it CUDA's). For CPU targets the package is registered without
    running its ``__init__`` and only the x86 or Arm module is imported (1-6 s).
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    if target.kind == "cuda":
        importlib.import_module(name)
        return
    import tvm.s_tir

    found = importlib.util.find_spec(name)
    assert found is not None  # tvm.s_tir, imported above, holds it
    package = importlib.util.module_from_spec(found)
    sys.modules[name] = package
    tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{name}.{'arm_cpu' if target.arch and 'aarch64' in target.arch else 'x86'}")


def tune(
    mod, target: Target, options: TuneOptions, progress: Callable[[int, int, str], None] | None = None
) -> TuningSummary:
    """Tune the kernels of Relax module ``mod`` for ``target`` into its database (see the module docstring)."""
    import cloudpickle
    import tvm
    from filelock import FileLock
    from tvm.s_tir import meta_schedule as ms

    from fxopt.codegen.compile import fusion_passes
    from fxopt.codegen.runtime import use_host_cores

    use_host_cores()  # before the runner's workers start: they measure with the thread pool kernels will run on
    _register_intrinsics(target)
    # Builder workers unpickle build_candidate; by value, so they need not import fxopt (and torch).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tvm_target = target.tvm()
    with tvm_target:
        fused = tvm.transform.Sequential(fusion_passes())(mod)
    # fxopt's kernel families (fxopt.codegen.kernels) have their own spaces: MetaSchedule failed to sample them.
    tasks = [
        task
        for task in ms.relax_integration.extract_tasks(fused, tvm_target)
        if not task.dispatched[0]["main"].attrs.get("tir.is_scheduled", False)
    ]
    try:
        path = database_dir(target, options.database)
    except OSError as exc:
        raise CodegenError(
            f"cannot tune: the tuning cache {exc.filename} is unusable ({exc.strerror}); set "
            f"FXOPT_CACHE_DIR or TuneOptions(database=...) to a writable directory"
        ) from None
    per_kernel = options.trials_per_kernel or target.tuning["trials_per_kernel"]
    summary = TuningSummary(path)
    start = time.monotonic()
    with FileLock(str(path / "lock")):
        checked_database(path)
        database = load_database(path)
        kernels = [KernelTuning(t.task_name, _trials(database, t), 0, None) for t in tasks]
        for kernel in kernels:
            kernel.trials_after = kernel.trials_before
        budget_left = options.trials
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i].weight * _flops(tasks[i]))
        pending = [i for i in order if kernels[i].trials_before < per_kernel]
        builder = ms.builder.LocalBuilder(
            f_build=build_candidate, max_workers=max(1, host_cpu().cores), initializer=_ignore_interrupts
        )
        runner = _runner(ms, target, options)
        interrupted = _Interrupt()
        # Templates first: a few candidates each, and their GEMMs and attention are most of a transformer's time.
        choices = TemplateChoices.load(path)
        isa = Isa.of(target)
        workloads = template_workloads(mod)
        for position, (family, workload) in enumerate(workloads):
            name = family.kernel_name(workload)
            candidates = family.space(workload, isa)
            stored = choices.chosen.get((family.name, workload))
            template = KernelTuning(name, 0 if stored is None else len(candidates), 0, stored.us if stored else None)
            template.trials_after = template.trials_before
            summary.templates.append(template)
            if stored is not None or summary.stopped or interrupted:
                continue
            if budget_left is not None and budget_left < len(candidates):
                summary.stopped = "trial budget spent"
            elif options.seconds is not None and time.monotonic() - start >= options.seconds:
                summary.stopped = "time budget spent"
            else:
                with interrupted.deferred(
                    lambda: progress and progress(position, len(workloads), "stopping after this kernel")
                ):
                    fastest = _fastest_candidate(ms, family, workload, candidates, tvm_target, builder, runner)
                choices.chosen[family.name, workload] = fastest
                choices.save(path)
                template.trials_after, template.best_us = len(candidates), fastest.us
                budget_left = None if budget_left is None else budget_left - len(candidates)
                if progress:
                    progress(position, len(workloads), f"tune {name}: {fastest.config}, {fastest.us:.1f} us")
        convs = conv_shapes(mod)
        costs = block_costs.load(path)
        measure = _block_pair_times(ms, isa, choices, tvm_target, builder, runner)
        for position, shape in enumerate(convs):
            if summary.stopped or interrupted:
                break
            if options.seconds is not None and time.monotonic() - start >= options.seconds:
                summary.stopped = "time budget spent"
                break
            with interrupted.deferred(
                lambda: progress and progress(position, len(convs), "stopping after this convolution")
            ):
                timed = block_costs.time_block_pairs(shape, isa, costs, measure)
            if timed:
                block_costs.save(path, costs)
                summary.block_pairs += timed
                if progress:
                    progress(position, len(convs), f"blocks of {block_costs.geometry_key(shape)}: {timed} timed")
        try:
            for position, i in enumerate(pending if not (summary.stopped or interrupted) else []):
                task, kernel = tasks[i], kernels[i]
                while kernel.trials_after < per_kernel:
                    if budget_left is not None and budget_left <= 0:
                        summary.stopped = "trial budget spent"
                        break
                    if options.seconds is not None and time.monotonic() - start >= options.seconds:
                        summary.stopped = "time budget spent"
                        break
                    if interrupted:
                        break
                    trials = min(_ROUND, per_kernel - kernel.trials_after, budget_left or _ROUND)
                    with interrupted.deferred(
                        lambda: (
                            progress
                            and progress(position, len(pending), "stopping after this round (Ctrl-C again: now)")
                        )
                    ):
                        _tune_round(ms, task, trials, builder, runner, database, path)
                    measured = _trials(database, task)
                    if budget_left is not None:
                        budget_left -= trials
                    if measured == kernel.trials_after:  # nothing new: the search space is exhausted
                        break
                    kernel.trials_after = measured
                    kernel.best_us = _best_us(database, task)
                    if progress:
                        best = f"{kernel.best_us:.1f} us" if kernel.best_us else "-"
                        progress(
                            position, len(pending), f"tune {kernel.name}: {measured}/{per_kernel} trials, best {best}"
                        )
                if summary.stopped or interrupted:
                    break
        except Exception:
            if not interrupted:
                raise
            # A second Ctrl-C inside TVM's C++ loop comes back as a RuntimeError around the KeyboardInterrupt.
        if interrupted:
            # Every record measured so far is in the database already (MetaSchedule appends as it goes).
            records = len(valid_lines(path / RECORDS_FILE, lambda entry: True))
            raise KeyboardInterrupt(f"interrupted: {records} tuning records kept in {path}")
        for task, kernel in zip(tasks, kernels):
            kernel.best_us = kernel.best_us or _best_us(database, task)
    summary.kernels = kernels
    summary.seconds = time.monotonic() - start
    return summary


class _Interrupt:
    """Ctrl-C while tuning: a KeyboardInterrupt raised inside MetaSchedule's C++ loop surfaces as a RuntimeError
    with a traceback through TVM, so the first one only asks to stop after the running round; a second stops
    at once."""

    def __init__(self):
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested

    @contextlib.contextmanager
    def deferred(self, on_request: Callable[[], None]):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            on_request()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _ignore_interrupts() -> None:
    """In builder workers: Ctrl-C reaches the whole process group, and each worker printed a traceback of its
    own; the tuning process stops them and says what was kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fastest_candidate(ms, family: KernelFamily, workload: Workload, candidates, tvm_target, builder, runner) -> Choice:
    """The fastest of ``family``'s ``candidates`` (configs) for ``workload``, as :func:`_timed` times them;
    tuning fails only when none ran."""
    name = family.kernel_name(workload)
    seconds, failures = _timed(
        ms, [family.build(workload, config) for config in candidates], tvm_target, builder, runner
    )
    for i, failure in sorted(failures.items()):
        logger.warning("fxopt: warning: %s, candidate %s %s", name, candidates[i], failure)
    fastest = min(range(len(candidates)), key=seconds.__getitem__)
    if seconds[fastest] == math.inf:
        i, failure = min(failures.items())
        raise CodegenError(f"tuning {name}: no candidate ran ({candidates[i]} {failure})")
    return Choice(candidates[fastest], seconds[fastest] * 1e6)


def _timed(ms, kernels: list, tvm_target, builder, runner) -> tuple[list[float], dict[int, str]]:
    """Seconds each of ``kernels`` (PrimFuncs) takes, built and timed by MetaSchedule's builder and runner (locally
    or on the RPC device) on random inputs, and why those that did not (infinite) failed. Two rounds over all of
    them, each kernel's fastest repeat: a neighbour's burst of work slows one round of one kernel, and does not pick
    the winner."""
    import tvm

    built = builder.build([ms.builder.BuilderInput(tvm.IRModule({"main": k}), tvm_target) for k in kernels])
    failures = {i: f"does not build: {_last_line(b.error_msg)}" for i, b in enumerate(built) if b.error_msg}
    ran = [i for i in range(len(kernels)) if i not in failures]
    inputs = [
        ms.runner.RunnerInput(built[i].artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(kernels[i]))
        for i in ran
    ]
    seconds = [math.inf] * len(kernels)
    for i, future in zip(ran * 2, runner.run(inputs * 2) if inputs else []):
        result = future.result()
        if result.error_msg:
            failures.setdefault(i, f"failed: {_last_line(result.error_msg)}")
        else:
            seconds[i] = min(seconds[i], *(float(s) for s in result.run_secs))
    return seconds, failures


def _block_pair_times(ms, isa: Isa, choices: TemplateChoices, tvm_target, builder, runner):
    """``measure`` for :func:`~fxopt.codegen.block_costs.time_block_pairs`: each shape's kernel with the config
    builds will give it (tuned in ``choices``, else its family's default), in microseconds (None where no kernel
    computes one, or it failed), timed together."""

    def measure(shapes: list[ConvShape]) -> list[float | None]:
        kernels = [conv_kernel(shape, isa) for shape in shapes]
        built = []
        for family, computed in filter(None, kernels):
            built.append(family.build(computed.workload, choices.config(family, computed.workload, isa)))
        seconds = iter(_timed(ms, built, tvm_target, builder, runner)[0] if built else [])
        times = [None if kernel is None else next(seconds) for kernel in kernels]
        return [None if t is None or t == math.inf else t * 1e6 for t in times]

    return measure


def _last_line(message: str) -> str:
    """What MetaSchedule's builder or runner says went wrong: its message is a traceback ending with the error."""
    return message.strip().splitlines()[-1]


def _tune_round(ms, task, trials: int, builder, runner, database, path: Path) -> None:
    # The context is built here rather than by ``extracted_tasks_to_tune_contexts``: that helper
    # runs ``logging.config.dictConfig`` on every call, which rewires the process's logging and
    # fails outright once another library has put an unnamed handler on MetaSchedule's logger.
    meta_schedule_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    meta_schedule_logger.setLevel(logging.WARNING)
    context = ms.TuneContext(
        mod=task.dispatched[0],
        target=task.target,
        space_generator="post-order-apply",
        search_strategy="evolutionary",
        task_name=task.task_name,
        logger=meta_schedule_logger,
        num_threads=max(1, host_cpu().cores),
    ).clone()
    ms.tune_tasks(
        tasks=[context],
        task_weights=[task.weight],
        work_dir=str(path / "logs"),
        max_trials_global=trials,
        num_trials_per_iter=trials,
        builder=builder,
        runner=runner,
        database=database,
    )


def _runner(ms, target: Target, options: TuneOptions):
    repeat = target.tuning["repeat"]
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=repeat, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if options.rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=30)
    host, _, port = options.rpc.rpartition(":")
    if not host or not port.isdigit() or not options.device_key:
        raise CodegenError(
            f"remote tuning needs rpc='HOST:PORT' and a device_key (got rpc={options.rpc!r}, "
            f"device_key={options.device_key!r})"
        )
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=options.device_key, session_timeout_sec=60
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator)


def _workload(database, task):
    mod = task.dispatched[0]
    return database.commit_workload(mod) if database.has_workload(mod) else None


def _trials(database, task) -> int:
    workload = _workload(database, task)
    return 0 if workload is None else len(database.get_top_k(workload, 1 << 30))


def _best_us(database, task) -> float | None:
    workload = _workload(database, task)
    top = database.get_top_k(workload, 1) if workload is not None else []
    if not top or not top[0].run_secs:
        return None
    secs = [float(s) for s in top[0].run_secs]
    return sum(secs) / len(secs) * 1e6


def _flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # estimation fails on some kernels; then only the weight orders them
        return 1.0
