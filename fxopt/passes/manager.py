"""The pass manager: runs a pipeline on a program, verifying, instrumenting and recording each pass, and on a
verification failure bisects to the first pass and node responsible."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.fx as fx

from fxopt.calibration import Calibration
from fxopt.errors import FxoptError, PassError, PipelineError, VerificationError
from fxopt.ir.analysis import count_flops, count_parameters
from fxopt.ir.meta import describe_node, graph_state, propagate_meta_since
from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.ir.printer import format_program
from fxopt.ir.program import Program
from fxopt.ir.verify import verify
from fxopt.passes.base import Pass, PassContext, missing_calibration
from fxopt.passes.pipeline import VERIFY_MODES, Pipeline, VerifyMode
from fxopt.passes.spec import registered_passes, unknown_name

__all__ = ["PassManager", "PassRecord"]


@dataclass
class PassRecord:
    """What one pass did: the row of the report."""

    name: str
    spec: str
    seconds: float
    changed: bool
    nodes: tuple[int, int]
    params: tuple[int, int]
    flops: tuple[int, int]
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)  # rules that fired -> where they are written


Progress = Callable[[int, int, str], None]


class PassManager:
    """Runs a pipeline over a program with verification and instrumentation.

    Parameters
    ----------
    pipeline:
        Anything :meth:`Pipeline.coerce` accepts.
    verify:
        ``"each"`` checks outputs against the reference after every pass;
        ``"end"`` checks once at the end and, on failure, bisects to the first
        failing pass and node; ``"off"`` checks only IR structure.
    print_ir_after:
        Pass names to dump the IR after, or ``"all"``, or ``"change"`` (after
        every pass that changed the graph). ``print_ir_before`` likewise.
    dump_dir:
        Write dumps to numbered files there instead of ``stream``.
    progress:
        Called as ``progress(index, total, pass_spec)`` before each pass.
    calibration:
        Inputs for data-driven passes (anything :meth:`Calibration.coerce`
        accepts); overrides the pipeline file's ``[calibration]``.
    """

    def __init__(
        self,
        pipeline: str | Path | Sequence[Pass] | Pipeline,
        *,
        verify: VerifyMode | None = None,
        tolerance: Tolerance | None = None,
        print_ir_after: Iterable[str] = (),
        print_ir_before: Iterable[str] = (),
        dump_dir: str | Path | None = None,
        stream: TextIO | None = None,
        progress: Progress | None = None,
        calibration: object = None,
    ):
        self.pipeline = Pipeline.coerce(pipeline)
        self.calibration = Calibration.coerce(calibration) or self.pipeline.calibration
        self.verify = verify or self.pipeline.verify or "end"
        if self.verify not in VERIFY_MODES:
            raise PipelineError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        self.tolerance = tolerance or self.pipeline.tolerance or Tolerance()
        self.print_ir_after = frozenset(print_ir_after) | frozenset(self.pipeline.print_ir_after)
        self.print_ir_before = frozenset(print_ir_before)
        for selected in self.print_ir_after | self.print_ir_before:
            if selected not in ("all", "change") and selected not in registered_passes():
                raise unknown_name(selected)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.stream = stream
        self.progress = progress
        self._dumps = 0

    def run(self, program: Program, reference: Sequence | None = None) -> tuple[Program, list[PassRecord]]:
        """Run every pass on a copy of ``program``; return the result and one record per pass.

        ``reference``: the original model's flat outputs on ``program.example_inputs``
        (defaults to running ``program`` itself). Exact passes must keep the
        outputs within the tolerance; a lossy pass (pruning, quantization) is
        not held to it: its record carries the error it introduced, and the
        exact passes after it are checked against its output.
        """
        self.check_calibration()
        reference = program.run_flat() if reference is None else tuple(reference)
        current = program
        records: list[PassRecord] = []
        passes = self.pipeline.passes
        start = 0  # exact passes since the last lossy one are checked against its output
        for index, p in enumerate(passes):
            if self.progress:
                self.progress(index, len(passes), str(p))
            if not p.exact and self.verify == "end" and index > start:
                self._check(records[-1], current, reference, passes[start:index], program)
            step = self._step_progress(index, len(passes), str(p))
            current, record = self._run_one(p, current, [r.name for r in records], step)
            if not p.exact:
                # A lossy pass is measured, not judged: its row shows what it changed, and it becomes the baseline.
                outputs = current.run_flat()
                record.max_abs_error, record.max_rel_error, _ = compare_outputs(outputs, reference, self.tolerance)
                reference, program, start = outputs, current, index + 1
            elif self.verify == "each":
                self._check(record, current, reference, passes[start : index + 1], program)
            records.append(record)
        changed = [r.name for r in records if r.changed]
        if changed and self.verify != "each":  # "each" checked it after every pass
            try:
                verify(current)  # the metadata the passes' changes updated, against the whole graph's propagation
            except VerificationError as exc:
                raise PassError(f"after passes {', '.join(changed)}: {exc} (verify='each' names the pass)") from exc
        if self.verify == "end" and start < len(passes):
            self._check(records[-1], current, reference, passes[start:], program)
        return current, records

    def check_calibration(self) -> None:
        """Raise :class:`~fxopt.errors.PassError` if a pass needs calibration data and none was given."""
        if self.calibration is not None:
            return
        for p in self.pipeline.passes:
            need = p.calibration_need()
            if need is not None:
                raise missing_calibration(need)

    def _run_one(
        self, p: Pass, program: Program, done: list[str], progress: Callable[[str], None] | None = None
    ) -> tuple[Program, PassRecord]:
        self._dump(p, program, "before", selected=self.print_ir_before)
        work = program.clone()
        ctx = self._context(p, progress)
        before = _measure(program)
        start = time.perf_counter()
        try:
            changed = _apply(p, work, ctx)
            if changed:  # an unchanged graph is the input, verified already
                # The metadata _apply updated is checked against the whole graph's once, at the end, unless "each".
                verify(work, check_meta=self.verify == "each")
        except FxoptError as exc:  # wrapped, not rebuilt: a subclass's constructor may take other arguments
            raise PassError(f"pass '{p.name}' failed: {exc} (passes already run: {', '.join(done) or 'none'})") from exc
        except Exception as exc:
            raise PassError(
                f"pass '{p.name}' raised {type(exc).__name__}: {exc} "
                f"(passes already run: {', '.join(done) or 'none'}; the input graph is unchanged)"
            ) from exc
        seconds = time.perf_counter() - start
        after = _measure(work)
        record = PassRecord(
            p.name,
            str(p),
            seconds,
            changed,
            (before[0], after[0]),
            (before[1], after[1]),
            (before[2], after[2]),
            stats=dict(ctx.stats),
            notes=list(ctx.notes),
            rules=dict(ctx.rules),
        )
        if (
            "all" in self.print_ir_after
            or p.name in self.print_ir_after
            or (changed and "change" in self.print_ir_after)
        ):
            self._dump(p, work, "after", selected={"all"})
        return (work if changed else program), record

    def _context(self, p: Pass, progress: Callable[[str], None] | None = None) -> PassContext:
        return PassContext(
            pass_name=p.name, config=self.pipeline.config, calibration=self.calibration, progress=progress
        )

    def _step_progress(self, index: int, total: int, spec: str) -> Callable[[str], None] | None:
        """Progress within pass ``index``: the manager's callback with the pass's detail after its spec."""
        progress = self.progress
        if progress is None:
            return None
        return lambda detail: progress(index, total, f"{spec}: {detail}")

    def _check(
        self, record: PassRecord, program: Program, reference: Sequence, run: Sequence[Pass], original: Program
    ) -> None:
        outputs = program.run_flat()
        worst_abs, worst_rel, failing = compare_outputs(outputs, reference, self.tolerance)
        record.max_abs_error, record.max_rel_error = worst_abs, worst_rel
        if failing is None:
            return
        culprit, detail = self._bisect(original, reference, run)
        raise VerificationError(
            f"output {failing} differs from the original model after pass '{culprit}' "
            f"(max abs error {worst_abs:.3g}, relative to output scale {worst_rel:.3g}; "
            f"bound atol={self.tolerance.atol:g} rtol={self.tolerance.rtol:g}). {detail}"
        )

    def _bisect(self, original: Program, reference: Sequence, run: Sequence[Pass]) -> tuple[str, str]:
        """Find the first pass whose output breaks equivalence, and the first node that diverges."""

        def apply_prefix(k: int) -> Program:
            program = original
            for p in run[:k]:
                program = self._apply_quiet(p, program)
            return program

        def ok(k: int) -> bool:
            return compare_outputs(apply_prefix(k).run_flat(), reference, self.tolerance)[2] is None

        lo, hi = 0, len(run)  # invariant: prefix lo is fine, prefix hi is not
        if ok(0) is False:
            return "capture", "The captured graph itself differs from the model."
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        before = apply_prefix(hi - 1)
        after = self._apply_quiet(run[hi - 1], before)
        return run[hi - 1].name, _first_divergent_node(before, after, self.tolerance, run[hi - 1].name)

    def _apply_quiet(self, p: Pass, program: Program) -> Program:
        work = program.clone()
        _apply(p, work, self._context(p))
        return work

    def _dump(self, p: Pass, program: Program, when: str, selected: Iterable[str]) -> None:
        selected = set(selected)
        if not ("all" in selected or p.name in selected):
            return
        text = f"// IR {when} {p}\n{format_program(program)}\n"
        self._dumps += 1
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{self._dumps:03d}-{p.name}.{when}.txt").write_text(text)
        else:
            print(text, file=self.stream or sys.stderr)


def _measure(program: Program) -> tuple[int, int, int]:
    nodes = sum(1 for n in program.graph.nodes if n.op == "call_function")
    return nodes, count_parameters(program), count_flops(program)


def _node_values(program: Program) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    with torch.no_grad():
        Recorder(program.graph_module).run(*program.example_inputs)
    return values


def _apply(p: Pass, program: Program, ctx: PassContext) -> bool:
    """Run one pass; after one that changed the graph, its code is regenerated and its metadata re-propagated here
    (what the change can have affected), once, rather than in every pass."""
    state = graph_state(program.graph_module)
    changed = bool(p.apply(program, ctx))
    if changed:
        program.graph_module.recompile()
        propagate_meta_since(program.graph_module, state)
    return changed


def _first_divergent_node(before: Program, after: Program, tolerance: Tolerance, pass_name: str) -> str:
    """Name the first value that changed, and the nearest node the pass created upstream of it."""
    old, new = _node_values(before), _node_values(after)
    for node in after.graph.nodes:
        ref, out = old.get(node.name), new.get(node.name)
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor) or node.op == "output":
            continue
        if compare_outputs([out], [ref], tolerance)[2] is None:
            continue
        created = _nearest_created(node, pass_name)
        text = f"First diverging value: {describe_node(node)}."
        if created is not None and created is not node:
            text += f" Nearest node the pass created upstream: {describe_node(created)}."
        return text
    return "No single intermediate value diverges; the outputs differ only at the end."


def _nearest_created(node: fx.Node, pass_name: str) -> fx.Node | None:
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        prov = current.meta.get("fxopt_provenance")
        if prov is not None and prov.pass_name == pass_name:
            return current
        frontier.extend(current.all_input_nodes)
    return None
