"""The pass interface: a frozen dataclass whose fields are its options."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fxopt.calibration import Calibration
from fxopt.errors import PassError
from fxopt.ir.meta import describe_node
from fxopt.ir.pattern import Rule, rewrite
from fxopt.ir.program import Program

__all__ = ["Pass", "PassContext", "Option", "option", "missing_calibration", "format_pass", "format_value", "type_name"]


def option(default: Any, doc: str) -> Any:
    """Declare a pass option: a dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable: use a tuple")
    return field(default=default, metadata={"doc": doc})


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or none"
    return getattr(tp, "__name__", str(tp))


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


@dataclass(frozen=True)
class Option:
    """One option of a pass, as the spec grammar and docs see it."""

    name: str  # kebab-case, as written in specs
    field: str  # the dataclass field
    type: Any
    default: Any
    doc: str

    def type_name(self) -> str:
        return type_name(self.type)


@dataclass
class PassContext:
    """What a pass may use and report while it runs.

    ``stats`` counts what the pass did (``ctx.count("folded")``); ``notes``
    records why it skipped candidates (``ctx.skip(node, "conv has other users")``);
    ``config`` holds the pipeline file's extra tables (tuning, ...);
    ``calibration`` the inputs data-driven passes run on, when given;
    ``progress(detail)`` shows how far a long pass has got (calibration batches);
    :meth:`rewrite` applies a pass's rules.
    """

    pass_name: str = ""
    config: dict = field(default_factory=dict)
    calibration: Calibration | None = None
    progress: Callable[[str], None] | None = None
    stats: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)  # rule name -> where it is written, for rules that fired

    def rewrite(self, program: Program, rules: Iterable[Rule]) -> bool:
        """Apply ``rules`` with :func:`fxopt.ir.rewrite`: each rule's hits counted under its name, each
        :class:`~fxopt.ir.Skip` noted against its node. Whether anything changed."""
        rules = tuple(rules)  # read twice: by the driver, then for the fired rules' locations
        hits = rewrite(
            program,
            rules,
            self.pass_name,
            skipped=lambda node, reason: self.skip(describe_node(node), reason),
            propagate=False,
        )
        located = {rule.name: rule.location for rule in rules}
        for name, n in hits.items():
            self.count(name, n)
            self.rules[name] = located[name]
        return bool(hits)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    def require_calibration(self, what: str) -> Calibration:
        """The calibration data, or an error saying that ``what`` needs it and how to give it."""
        if self.calibration is None:
            raise missing_calibration(what)
        return self.calibration

    def skip(self, where: str, reason: str) -> None:
        """Record a candidate left alone; a pass that revisits the same candidate records it once."""
        note = f"skipped {where}: {reason}"
        if note not in self.notes:
            self.stats["skipped"] += 1
            self.notes.append(note)


def missing_calibration(what: str) -> PassError:
    """The error for ``what`` (a pass, or its option) run without calibration data: it says how to give some."""
    return PassError(
        f"{what} needs calibration data: optimize(..., calibration=batches), a [calibration] "
        f"table in the pipeline file, or --calibration FILE.pt on the command line"
    )


@dataclass(frozen=True)
class Pass:
    """Base class of fxopt passes.

    Subclasses are frozen dataclasses: ``name`` is the kebab-case name used in
    pipeline specs, dataclass fields (declared with :func:`option`) are the
    options, and :meth:`apply` rewrites the program in place and returns
    whether it changed anything. The pass manager hands ``apply`` a private
    copy, so a pass that raises leaves the caller's program as it was.

    Class attributes: ``exact`` (does the pass preserve outputs up to float
    rounding?), ``requires`` (passes that must run earlier in the same
    pipeline), ``before`` (passes that, when present, must run later).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()

    def apply(self, program: Program, ctx: PassContext) -> bool:
        raise NotImplementedError(f"pass '{self.name}' does not implement apply")

    def calibration_need(self) -> str | None:
        """What of this pass, with these options, runs on calibration data (``"quantize{scheme=w8a8}"``), or None.
        The manager asks before running anything, so a missing ``calibration`` fails at once, not minutes in."""
        return None

    def check_later(self, later: Sequence[Pass]) -> None:
        """Raise :class:`~fxopt.errors.PipelineError` if the passes after this one do not fit its options."""

    @classmethod
    def options(cls) -> list[Option]:
        hints = typing.get_type_hints(cls)
        return [
            Option(f.name.replace("_", "-"), f.name, hints[f.name], f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def summary(cls) -> str:
        """First paragraph of the docstring: what the pass does."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())

    def __str__(self) -> str:
        return format_pass(self)
