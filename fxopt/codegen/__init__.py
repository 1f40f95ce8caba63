"""Backends: turn an optimized :class:`~fxopt.ir.Program` into something callable.

``target.kind == "torch"`` runs the optimized graph in PyTorch. The TVM
targets (``cpu``, ``cuda``, ``aarch64``) go through:

1. :func:`~fxopt.codegen.partition.partition` — segments TVM can take; ops
   without a lowering stay in PyTorch and are reported by name;
2. :func:`~fxopt.codegen.lower.lower_graph` — each segment to a Relax function
   (one ``IRModule`` for the whole model);
3. :func:`~fxopt.codegen.tune.tune` (optional) — MetaSchedule, with a
   persistent database;
4. :func:`~fxopt.codegen.compile.compile_module` — one build, one library;
5. :func:`~fxopt.codegen.dispatch.choose` — per segment, TVM only where it
   matches PyTorch numerically and is measured faster.

Codegen never rewrites the optimized program: partitioning works on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import torch

# Imported for the lowerings they register.
from fxopt.codegen import lower_contractions, lower_conv, lower_elementwise, lower_quantized  # noqa: F401
from fxopt.codegen.chain import chained_parent, find_chains, lower_chain
from fxopt.codegen.compile import compile_module, kernel_source
from fxopt.codegen.dispatch import Choice, Timing, choose, device_sync, measure_runners
from fxopt.codegen.export import export_program
from fxopt.codegen.lower import LoweringError, lower_graph
from fxopt.codegen.partition import Segment, partition
from fxopt.codegen.runtime import TVMFunction, load_vm
from fxopt.codegen.templates import TemplateChoices
from fxopt.codegen.tune import TuningSummary
from fxopt.codegen.tune import tune as run_tuning
from fxopt.codegen.tuning_database import existing_database
from fxopt.errors import CodegenError, first_line
from fxopt.ir.numerics import Tolerance
from fxopt.ir.program import Program
from fxopt.targets import Target
from fxopt.timing import OtherLoad

__all__ = ["Executable", "SegmentRecord", "build", "Dispatch"]

Dispatch = Literal["measure", "tvm", "torch"]


@dataclass
class SegmentRecord:
    """Where one segment runs and why: the report's per-partition line."""

    name: str
    ops: str
    backend: str
    torch_ms: float | None
    tvm_ms: float | None
    reason: str


@dataclass
class Executable:
    """A built model: call it with the model's arguments (inference, no autograd)."""

    program: Program  # the optimized program, as the passes left it
    target: Target
    backend: str  # "torch", "tvm" or "tvm+torch"
    note: str
    module: torch.nn.Module  # what runs: the program, or its partition with TVM segments
    segments: list[SegmentRecord] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    relax_executable: object | None = None
    tuning: TuningSummary | None = None
    latency: tuple[float, float] | None = None  # ms on the example inputs: all in PyTorch, as built

    def __call__(self, *args, **kwargs):
        if self.target.device == "cuda" and torch.cuda.is_available():
            args, kwargs = _to_device((args, kwargs), "cuda")
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def kernel_source(self, fmt: str | None = None) -> str:
        """Generated kernels: CUDA C for CUDA targets; LLVM IR (``fmt="ll"``) or assembly (``"asm"``) for CPU."""
        if self.relax_executable is None:
            raise CodegenError(f"nothing was compiled for target '{self.target}' (backend: {self.backend})")
        return kernel_source(self.relax_executable, fmt)

    def export(self, path: str | Path, weights: bool = True) -> Path:
        """Write the whole graph as a deployable TVM library directory (see :mod:`fxopt.codegen.export`)."""
        database = self.tuning.database_dir if self.tuning else existing_database(self.target)
        return export_program(self.program, self.target, path, database, weights)


def build(
    program: Program,
    target: Target,
    *,
    dispatch: Dispatch = "measure",
    tolerance: Tolerance | None = None,
    tune=None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Executable:
    """Build ``program`` for ``target``.

    ``dispatch="measure"`` keeps TVM per segment only where it is measured
    faster; ``"tvm"`` uses TVM wherever it lowers and matches numerically;
    ``"torch"`` compiles but runs everything in PyTorch. ``tune`` is a
    :class:`~fxopt.codegen.tune.TuneOptions` (or ``None`` for untuned kernels).
    """
    if target.kind == "torch":
        return Executable(program, target, "torch", "the optimized graph runs in PyTorch", program)
    if target.kind == "cuda" and target.arch is None and not torch.cuda.is_available():
        return Executable(
            program,
            target,
            "torch",
            "no CUDA device is visible, so the optimized graph runs in PyTorch on the CPU; name an architecture "
            "(e.g. 'cuda:sm_90') to build CUDA kernels anyway",
            program,
        )
    target = target.resolved()
    runnable = not target.is_cross
    if runnable and target.device == "cuda":
        program = _program_to(program, "cuda")
    tolerance = tolerance or Tolerance()

    part = partition(program)
    # Schedules tuned earlier (or shipped) for this target apply without tuning again.
    database_dir = existing_database(target) if tune is None else None
    templates = TemplateChoices.load(database_dir)
    mod, records, chains = _lower_segments(part, target, templates)
    if not mod.functions:
        return _torch_only(program, target, part, records, "nothing in the graph could be lowered to TVM")

    tuning = None
    if tune is not None:
        tuning = run_tuning(mod, target, tune, progress=progress)
        database_dir = tuning.database_dir
        tuned = TemplateChoices.load(database_dir)
        if tuned != templates:  # lowered again, with the template parameters tuning measured
            mod, records, chains = _lower_segments(part, target, tuned)
    executable = compile_module(mod, target, database_dir)

    if not runnable:
        for segment in part.segments:
            records.setdefault(
                segment.name,
                SegmentRecord(
                    segment.name, segment.summary, "torch", None, None, "built only: target cannot run on this machine"
                ),
            )
        result = _torch_only(
            program,
            target,
            part,
            records,
            f"kernels built for {target.describe()}; this machine "
            "cannot run them, so the optimized graph runs in PyTorch here",
        )
        result.relax_executable = executable
        result.tuning = tuning
        return result

    vm = load_vm(executable, target.device)
    load = OtherLoad()  # what else ran while segments and plans were timed: said in the note
    verified: dict[str, Segment] = {}  # segments whose kernels compute PyTorch's values, whichever backend was chosen
    timings: dict[str, tuple[str, Timing]] = {}  # segments computing the same thing on the same shapes
    for i, segment in enumerate(part.segments):
        if segment.name in records:
            continue
        if progress:
            progress(i, len(part.segments), f"measure {segment.name}")
        kernel = TVMFunction(vm, segment.name, _output_strides(segment.graph_module))
        key = _timing_key(segment)
        same, reused = timings.get(key, (None, None))
        try:
            choice, timing = choose(
                segment.graph_module,
                kernel,
                segment.example_inputs,
                tolerance,
                device=target.device,
                measure_speed=dispatch == "measure",
                timed=reused,
            )
        except Exception as exc:  # a segment that cannot be checked or timed runs in PyTorch; the build goes on
            choice = Choice("torch", None, None, f"checking TVM's kernel failed: {first_line(exc)}")
        else:
            if timing is not None:
                timings.setdefault(key, (segment.name, timing))
                if same is not None:
                    choice.reason += f" (timed as {same})"
            if choice.backend == "tvm" or timing is not None:
                verified[segment.name] = segment
        if dispatch == "torch" and choice.backend == "tvm":
            choice.backend, choice.reason = "torch", "PyTorch requested (dispatch='torch')"
        if choice.backend == "tvm":
            part.graph_module.add_submodule(segment.name, kernel)
        records[segment.name] = SegmentRecord(
            segment.name,
            segment.summary,
            choice.backend,
            _ms(choice.torch_seconds),
            _ms(choice.tvm_seconds),
            choice.reason,
        )
    ordered = [records[s.name] for s in part.segments]
    chains = [c for c in chains if all(name in verified for name in c.segments)]
    _lay_out_only_for_pytorch(part.graph_module)  # as it runs, before it is timed against the chained plan
    chained = None
    if dispatch != "torch" and chains:
        # The other plan: every verified segment in TVM, each chain one VM call (no PyTorch between its calls).
        kernels: dict[str, torch.nn.Module] = {
            name: TVMFunction(vm, name, _output_strides(s.graph_module)) for name, s in verified.items()
        }
        kernels.update({c.name: TVMFunction(vm, c.name, _item_strides(c.outputs)) for c in chains})
        chained = chained_parent(part.graph_module, kernels, chains)
        _lay_out_only_for_pytorch(chained)
    # The whole model, every plan timed in the same rounds: all in PyTorch (the baseline), per segment as
    # dispatched (when any segment runs in TVM; else it is the baseline again), chained.
    plans = {"torch": program}
    if any(r.backend == "tvm" for r in ordered):
        plans["segments"] = _as_program(program, part.graph_module)
    if chained is not None:
        plans["chained"] = _as_program(program, chained)
    timed: dict[str, list[float]] = {}
    if dispatch == "measure" and len(plans) > 1:
        with torch.no_grad():
            samples = measure_runners(list(plans.values()), program.example_inputs, sync=device_sync(target.device))
        timed = dict(zip(plans, samples))
        # The faster of the TVM plans that beat PyTorch by the margin in every round (between two TVM plans
        # neither is the safe default); none: the whole-model check below keeps PyTorch.
        faster = [
            p for p in ("chained", "segments") if p in timed and Timing.of(timed["torch"], timed[p]).second_is_faster
        ]
        if min(faster, key=lambda p: min(timed[p]), default=None) != "chained":
            chained = None
    contention = _contention(load, target) if dispatch == "measure" else ""
    if chained is not None:
        part.graph_module = chained
        for record in ordered:
            if record.name in verified and record.backend != "tvm":
                record.backend = "tvm"
                record.reason += "; in TVM with its neighbours, one call (the whole model measured faster)"
    in_tvm = sum(r.backend == "tvm" for r in ordered)
    backend = "tvm" if in_tvm == len(ordered) and not part.fallbacks else ("tvm+torch" if in_tvm else "torch")
    note = f"{in_tvm} of {len(ordered)} segments run in TVM on {target.describe()}"
    if chained is not None:
        note += f", consecutive ones as one call ({len(chains)} call{'s' if len(chains) > 1 else ''})"
    if part.fallbacks:
        note += f"; {len(part.fallbacks)} ops have no lowering and run in PyTorch"
    note += contention
    module = _as_program(program, part.graph_module)
    latency = None
    if dispatch == "measure" and in_tvm:
        # Per-segment wins need not add up (segment boundaries cost copies and layout changes): the whole
        # model as built is compared with the all-PyTorch plan, which is kept unless the mix is faster.
        whole = Timing.of(timed["torch"], timed["chained" if chained is not None else "segments"])
        latency = (whole.first_seconds * 1e3, whole.second_seconds * 1e3)
        if not whole.second_is_faster:
            for record in ordered:
                if record.backend == "tvm":
                    record.backend, record.reason = "torch", record.reason + "; the whole model was not faster"
            result = _torch_only(
                program,
                target,
                part,
                records,
                f"the whole model measured no faster with "
                f"{in_tvm} segments in TVM ({latency[1]:.3g} ms vs {latency[0]:.3g} ms in "
                f"PyTorch), so it runs in PyTorch{contention}",
            )
            result.relax_executable, result.tuning, result.latency = executable, tuning, latency
            return result
    return Executable(
        program, target, backend, note, module, ordered, part.fallback_summary(), executable, tuning, latency
    )


def _lower_segments(part, target: Target, templates: TemplateChoices) -> tuple:
    """One IRModule of every segment that lowers and of the chains between them (:mod:`.chain`), a record of each
    segment that does not (it runs in PyTorch), and the chains."""
    import tvm

    mod, records = tvm.IRModule(), {}
    for segment in part.segments:
        try:
            lowered = lower_graph(segment.graph_module, segment.name, target, templates=templates)
            clash = {v.name_hint for v in lowered.get_global_vars()} & {v.name_hint for v in mod.get_global_vars()}
            if clash:
                raise CodegenError(f"segment {segment.name}: kernel names {sorted(clash)} are taken by another segment")
            mod.update(lowered)
        except (LoweringError, CodegenError) as exc:
            records[segment.name] = SegmentRecord(segment.name, segment.summary, "torch", None, None, str(exc))
    chains = find_chains(part.graph_module, {s.name for s in part.segments if s.name not in records})
    for chain in chains if mod.functions else []:
        lower_chain(chain, mod)
    return mod, records, chains


def _contention(load: OtherLoad, target: Target) -> str:
    """The note's words when other processes kept a quarter of a core or more busy while timing."""
    cores = load.cores()
    if cores is None or cores < 0.25:
        return ""
    return (
        f"; timed while other processes kept {cores:.1f} of {target.cores} cores busy: on a quiet machine the "
        f"choices may differ"
    )


def _torch_only(program, target, part, records, note) -> Executable:
    ordered = [records[s.name] for s in part.segments if s.name in records]
    return Executable(program, target, "torch", note, program, ordered, part.fallback_summary())


def _timing_key(segment) -> str:
    """What decides a segment's speed: its ops and their wiring, and the shapes and dtypes of every value (node
    names differ between the layers of a model; weights' values do not matter)."""
    nodes = list(segment.graph_module.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}

    def spelled(value):
        return f"%{index[value]}" if isinstance(value, torch.fx.Node) else value

    lines = []
    for node in nodes:
        meta = node.meta.get("val")
        shape = (tuple(meta.shape), meta.dtype) if isinstance(meta, torch.Tensor) else None
        if node.op == "get_attr":
            value = getattr(segment.graph_module, node.target)
            shape = (tuple(value.shape), value.dtype)
        lines.append(
            (
                node.op,
                str(node.target) if node.op == "call_function" else None,
                shape,
                torch.fx.node.map_aggregate(node.args, spelled),
                torch.fx.node.map_aggregate(node.kwargs, spelled),
            )
        )
    inputs = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in segment.example_inputs]
    return repr((lines, inputs))


def _as_program(program: Program, graph_module: torch.fx.GraphModule) -> Program:
    return Program(graph_module, program.in_spec, program.out_spec, program.example_inputs, program.name)


def _item_strides(items: list[torch.fx.Node]) -> list[tuple[int, ...] | None]:
    """The strides PyTorch gives each of these values (None where unknown or symbolic)."""
    strides = []
    for item in items:
        meta = item.meta.get("val") if isinstance(item, torch.fx.Node) else None
        static = isinstance(meta, torch.Tensor) and all(isinstance(s, int) for s in meta.stride())
        strides.append(tuple(meta.stride()) if static and meta is not None else None)
    return strides


def _lay_out_only_for_pytorch(parent: torch.fx.GraphModule) -> None:
    """Drop the PyTorch layout of segment outputs that only TVM segments read: it costs a PyTorch copy between
    two TVM calls (and the next call copies it back to contiguous), and a PyTorch op between TVM calls runs
    against TVM's thread pool: on 2 cores one 0.03 ms copy made BERT's next segment take 4 ms longer."""
    for node in parent.graph.nodes:
        kernel = getattr(parent, node.target) if node.op == "call_module" else None
        if not isinstance(kernel, TVMFunction) or kernel.strides is None:
            continue
        for item in node.users:
            read_by = [getattr(parent, user.target) if user.op == "call_module" else None for user in item.users]
            if item.users and all(isinstance(reader, TVMFunction) for reader in read_by):
                kernel.strides[item.args[1]] = None


def _output_strides(graph_module: torch.fx.GraphModule) -> list[tuple[int, ...] | None]:
    """The strides PyTorch gives each output of a segment (None where unknown or symbolic)."""
    (outputs,) = graph_module.graph.output_node().args
    return _item_strides(list(cast(tuple[torch.fx.Node, ...], outputs)))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _to_device(tree, device: str):
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _program_to(program: Program, device: str) -> Program:
    # A deep copy: moving a clone would move the constants it shares with the optimized program.
    graph_module = copy.deepcopy(program.graph_module).to(device)
    inputs = tuple(_to_device(list(program.example_inputs), device))
    return Program(graph_module, program.in_spec, program.out_spec, inputs, program.name)
