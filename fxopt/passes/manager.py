"""Pipelines: the pass-spec grammar, pipeline files, ordering checks, and the instrumented pass manager.

Spec grammar (one parser, one printer, used by the CLI, TOML files and Python)::

    pipeline := item ("," item)*
    item     := NAME ["{" (KEY "=" VALUE)* "}"]      NAME: a pass or a named pipeline
    VALUE    := WORD | NUMBER | true | false | none | "quoted" | "[" [VALUE ("," VALUE)*] "]"

``str(pipeline)`` prints the canonical text, every option with its value, and
parsing that text gives the same pipeline back.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
import time
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import torch.fx as fx

from fxopt.errors import FxoptError, PassError, PipelineError, VerificationError
from fxopt.ir.analysis import count_flops, count_parameters
from fxopt.ir.calibration import Calibration
from fxopt.ir.meta import describe_node
from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.ir.printer import format_program
from fxopt.ir.program import Program
from fxopt.ir.verify import verify
from fxopt.passes.base import Pass, PassContext, missing_calibration, type_name

__all__ = [
    "BUILTIN_PIPELINES",
    "Pipeline",
    "PassManager",
    "PassRecord",
    "Tolerance",
    "compare_outputs",
    "format_pass",
    "format_value",
    "parse_pipeline",
]

# Named pipelines, usable wherever a pass name is. The per-target defaults are
# the exact rewrites; lossy ones (pruning, quantization) are always asked for.
BUILTIN_PIPELINES: dict[str, str] = {
    "cleanup": "remove-noops,fold-constants,cse,dce",
    "default": "remove-noops,fold-constants,fuse-norms,fold-conv-bn,fuse-blocks,fuse-attention,cse,dce,mark-epilogues",
    # Opt-in: exact, and faster where RMSNorm is one kernel (compiled backends), slower in eager PyTorch on CPU.
    "pre-rmsnorm": "remove-noops,fold-constants,fuse-norms,layernorm-to-rmsnorm,fold-conv-bn,fuse-blocks,"
                   "fuse-attention,cse,dce,mark-epilogues",
    "torch": "default",
    "cpu": "default",
    "cuda": "default",
}

VerifyMode = Literal["each", "end", "off"]


# ----------------------------------------------------------------------------- spec grammar

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<punct>[{}\[\],=])
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>[^']*)'
      | (?P<word>[^\s{}\[\],="']+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Item:
    name: str
    options: dict[str, Any]
    column: int


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline spec at column {pos + 1}: {text!r}")
        column = m.start() + (len(m.group(0)) - len(m.group(0).lstrip())) + 1
        if m.group("punct"):
            tokens.append(("punct", m.group("punct"), column))
        elif m.group("dq") is not None:
            tokens.append(("str", re.sub(r"\\(.)", r"\1", m.group("dq")), column))
        elif m.group("sq") is not None:
            tokens.append(("str", m.group("sq"), column))
        else:
            tokens.append(("word", m.group("word"), column))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, message: str) -> PipelineError:
        column = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text) + 1
        return PipelineError(f"{message} at column {column} of pipeline spec {self.text!r}")

    def peek(self, value: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        kind, tok, _ = self.tokens[self.i]
        return value is None or (kind == "punct" and tok == value)

    def expect(self, value: str) -> None:
        if not self.peek(value):
            raise self.error(f"expected '{value}'")
        self.i += 1

    def items(self) -> list[_Item]:
        items = []
        if not self.tokens:
            return items
        while True:
            items.append(self.item())
            if not self.peek():
                return items
            self.expect(",")

    def item(self) -> _Item:
        if not self.peek() or self.tokens[self.i][0] != "word":
            raise self.error("expected a pass name")
        _, name, column = self.tokens[self.i]
        self.i += 1
        options: dict[str, Any] = {}
        if self.peek("{"):
            self.i += 1
            while not self.peek("}"):
                if not self.peek() or self.tokens[self.i][0] != "word":
                    raise self.error(f"expected an option name or '}}' in the options of '{name}'")
                key = self.tokens[self.i][1]
                self.i += 1
                self.expect("=")
                if key in options:
                    raise self.error(f"option '{key}' of '{name}' given twice")
                options[key] = self.value()
            self.i += 1
        return _Item(name, options, column)

    def value(self) -> Any:
        if self.peek("["):
            self.i += 1
            values = []
            while not self.peek("]"):
                values.append(self.value())
                if not self.peek("]"):
                    self.expect(",")
            self.i += 1
            return values
        if not self.peek() or self.tokens[self.i][0] == "punct":
            raise self.error("expected a value")
        kind, tok, _ = self.tokens[self.i]
        self.i += 1
        return tok if kind == "str" else _Raw(tok)


class _Raw(str):
    """An unquoted word: its type is decided by the option it is given to."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and isinstance(value, _Raw) and value.lower() == "none":
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, where)
            except PipelineError:
                pass
        raise PipelineError(f"{where} expects {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == str(value):
                return choice
        raise PipelineError(f"{where} expects one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is tuple:
        (item_tp, *_) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(v, item_tp, where) for v in items)
    if isinstance(value, list):
        raise PipelineError(f"{where} expects {type_name(tp)}, got a list")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise PipelineError(f"{where} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise PipelineError(f"{where} expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise PipelineError(f"{where} expects a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported option type {tp}")  # a pass declared an option type the grammar lacks


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    text = str(value)
    if re.fullmatch(r"[^\s{}\[\],=\"']+", text) and text.lower() not in ("true", "false", "none"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pass(p: Pass) -> str:
    """The canonical spec of a pass: ``name{opt=value ...}`` with every option, or ``name``."""
    options = type(p).options()
    if not options:
        return p.name
    body = " ".join(f"{o.name}={format_value(getattr(p, o.field))}" for o in options)
    return f"{p.name}{{{body}}}"


def _registry() -> dict[str, type[Pass]]:
    from fxopt.passes import PASSES

    return PASSES


def _instantiate(item: _Item) -> Pass:
    registry = _registry()
    cls = registry[item.name]
    by_name = {o.name: o for o in cls.options()}
    kwargs = {}
    for key, value in item.options.items():
        opt = by_name.get(key) or by_name.get(key.replace("_", "-"))
        if opt is None:
            known = ", ".join(by_name) or "none"
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PipelineError(f"pass '{item.name}' has no option '{key}'{hint} (its options: {known})")
        kwargs[opt.field] = _convert(value, opt.type, f"option '{opt.name}' of pass '{item.name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a pass's own __post_init__ validation
        raise PipelineError(f"pass '{item.name}': {exc}") from None


def _unknown(name: str) -> PipelineError:
    candidates = list(_registry()) + list(BUILTIN_PIPELINES)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return PipelineError(f"unknown pass or pipeline '{name}'{hint} (`fxopt passes` lists them)")


def parse_pipeline(spec: str, _expanding: tuple[str, ...] = ()) -> list[Pass]:
    """Parse a spec string into pass objects, expanding named pipelines."""
    passes: list[Pass] = []
    for item in _Parser(spec).items():
        if item.name in _registry():
            passes.append(_instantiate(item))
        elif item.name in BUILTIN_PIPELINES:
            if item.options:
                raise PipelineError(f"named pipeline '{item.name}' takes no options")
            if item.name in _expanding:
                raise PipelineError(f"named pipeline '{item.name}' includes itself")
            passes.extend(parse_pipeline(BUILTIN_PIPELINES[item.name], _expanding + (item.name,)))
        else:
            raise _unknown(item.name)
    return passes


# ----------------------------------------------------------------------------- pipelines

_VERIFY_MODES = ("each", "end", "off")


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes plus the settings of a pipeline file.

    Build one from anything a user may hand over with :meth:`coerce`: a spec
    string (``"fold-conv-bn,dce"``), a named pipeline (``"default"``), the
    path of a TOML file, a list of pass objects, or a ``Pipeline``.
    """

    passes: tuple[Pass, ...]
    target: str | None = None
    verify: VerifyMode | None = None
    tolerance: Tolerance | None = None
    print_ir_after: tuple[str, ...] = ()
    config: dict = field(default_factory=dict, compare=False)
    calibration: Calibration | None = field(default=None, compare=False)

    def __post_init__(self):
        check_order(self.passes)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def to_toml(self) -> str:
        """The pipeline as a TOML file, every pass option filled in: :meth:`load` reads the same pipeline back."""
        lines = [f"passes = {_toml_value([str(p) for p in self.passes])}"]
        tables = {"target": {"name": self.target} if self.target else {}, "verify": {}, "instrument": {}}
        if self.verify is not None:
            tables["verify"]["mode"] = self.verify
        if self.tolerance is not None:
            tables["verify"].update({"rtol": self.tolerance.rtol, "atol": self.tolerance.atol,
                                     "half-rtol": self.tolerance.half_rtol})
        if self.print_ir_after:
            tables["instrument"]["print-ir-after"] = list(self.print_ir_after)
        for name, table in {**tables, **self.config}.items():
            if table:
                lines += ["", f"[{name}]"] + [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        return "\n".join(lines) + "\n"

    @staticmethod
    def parse(spec: str) -> Pipeline:
        return Pipeline(tuple(parse_pipeline(spec)))

    @staticmethod
    def load(path: str | Path) -> Pipeline:
        """Read a TOML pipeline file; see the README for its tables."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PipelineError(f"cannot read pipeline file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PipelineError(f"pipeline file {path} is not valid TOML: {exc}") from None
        return Pipeline.from_dict(data, origin=str(path), base=path.parent)

    @staticmethod
    def from_dict(data: dict, origin: str = "pipeline", base: Path | None = None) -> Pipeline:
        """A pipeline from a parsed TOML document; ``base`` is where relative paths in it start."""
        known = {"passes", "target", "verify", "instrument", "calibration", "tuning"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"{origin}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        specs = data.get("passes")
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise PipelineError(f"{origin}: 'passes' must be a list of pass-spec strings")
        passes = tuple(p for spec in specs for p in parse_pipeline(spec))
        target = _table(data, "target", origin)
        verify_table = _table(data, "verify", origin)
        instrument = _table(data, "instrument", origin)
        _only(target, {"name"}, f"{origin} [target]")
        _only(verify_table, {"mode", "rtol", "atol", "half-rtol"}, f"{origin} [verify]")
        _only(instrument, {"print-ir-after"}, f"{origin} [instrument]")
        mode = verify_table.get("mode")
        if mode is not None and mode not in _VERIFY_MODES:
            raise PipelineError(f"{origin} [verify] mode must be one of {', '.join(_VERIFY_MODES)}, got {mode!r}")
        tolerance = None
        if set(verify_table) - {"mode"}:
            tolerance = Tolerance(
                rtol=float(verify_table.get("rtol", Tolerance.rtol)),
                atol=float(verify_table.get("atol", Tolerance.atol)),
                half_rtol=float(verify_table.get("half-rtol", Tolerance.half_rtol)),
            )
        print_after = instrument.get("print-ir-after", ())
        print_after = (print_after,) if isinstance(print_after, str) else tuple(print_after)
        # [calibration] is loaded below; its table stays too, for to_toml().
        extra = {k: data[k] for k in ("calibration", "tuning") if k in data}
        try:
            calibration = Calibration.coerce(_table(data, "calibration", origin) or None, base=base)
        except FxoptError as exc:
            raise PipelineError(f"{origin}: {exc}") from None
        return Pipeline(passes, target.get("name"), mode, tolerance, print_after, extra, calibration)

    @staticmethod
    def coerce(pipeline: str | Path | Sequence[Pass] | Pipeline) -> Pipeline:
        if isinstance(pipeline, Pipeline):
            return pipeline
        if isinstance(pipeline, Path) or (isinstance(pipeline, str) and pipeline.endswith(".toml")):
            return Pipeline.load(pipeline)
        if isinstance(pipeline, str):
            return Pipeline.parse(pipeline)
        passes = tuple(pipeline)
        for p in passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"pipeline entries must be fxopt Pass objects, got {type(p).__name__}")
        return Pipeline(passes)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def _table(data: dict, key: str, origin: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise PipelineError(f"{origin}: [{key}] must be a table")
    return value


def _only(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")


def check_order(passes: Sequence[Pass]) -> None:
    """Enforce each pass's ``requires`` (must run earlier) and ``before`` (must run later) constraints."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        for required in p.requires:
            if required not in names[:i]:
                raise PipelineError(f"pass '{p.name}' requires '{required}' to run before it in the pipeline")
        for later in p.before:
            if later in names[:i]:
                raise PipelineError(f"pass '{p.name}' must run before '{later}', but '{later}' comes first")
        p.check_later(passes[i + 1:])


# ----------------------------------------------------------------------------- running

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
        if self.verify not in _VERIFY_MODES:
            raise PipelineError(f"verify must be one of {', '.join(_VERIFY_MODES)}, got {self.verify!r}")
        self.tolerance = tolerance or self.pipeline.tolerance or Tolerance()
        self.print_ir_after = frozenset(print_ir_after) | frozenset(self.pipeline.print_ir_after)
        self.print_ir_before = frozenset(print_ir_before)
        for selected in self.print_ir_after | self.print_ir_before:
            if selected not in ("all", "change") and selected not in _registry():
                raise _unknown(selected)
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
                self._check(record, current, reference, passes[start: index + 1], program)
            records.append(record)
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

    def _run_one(self, p: Pass, program: Program, done: list[str],
                 progress: Callable[[str], None] | None = None) -> tuple[Program, PassRecord]:
        self._dump(p, program, "before", selected=self.print_ir_before)
        work = program.clone()
        ctx = self._context(p, progress)
        before = _measure(program)
        start = time.perf_counter()
        try:
            changed = bool(p.apply(work, ctx))
            if changed:
                work.graph_module.recompile()
            verify(work)
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
            p.name, str(p), seconds, changed,
            (before[0], after[0]), (before[1], after[1]), (before[2], after[2]),
            stats=dict(ctx.stats), notes=list(ctx.notes),
        )
        if "all" in self.print_ir_after or p.name in self.print_ir_after or (changed and "change" in self.print_ir_after):
            self._dump(p, work, "after", selected={"all"})
        return (work if changed else program), record

    def _context(self, p: Pass, progress: Callable[[str], None] | None = None) -> PassContext:
        return PassContext(pass_name=p.name, config=self.pipeline.config, calibration=self.calibration,
                           progress=progress)

    def _step_progress(self, index: int, total: int, spec: str) -> Callable[[str], None] | None:
        """Progress within pass ``index``: the manager's callback with the pass's detail after its spec."""
        if self.progress is None:
            return None
        return lambda detail: self.progress(index, total, f"{spec}: {detail}")

    def _check(self, record: PassRecord, program: Program, reference: Sequence, run: Sequence[Pass], original: Program) -> None:
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
        if p.apply(work, self._context(p)):
            work.graph_module.recompile()
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
