"""Pipelines: an ordered list of passes with its verification, instrumentation, calibration and tuning
settings, from a spec string, a TOML file or pass objects, and the ordering checks between passes."""

from __future__ import annotations

import json
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fxopt.calibration import Calibration
from fxopt.errors import FxoptError, PipelineError
from fxopt.ir.numerics import Tolerance
from fxopt.passes.base import Pass
from fxopt.passes.spec import parse_pipeline

__all__ = ["Pipeline", "VERIFY_MODES", "VerifyMode", "check_order"]

VerifyMode = Literal["each", "end", "off"]

VERIFY_MODES = typing.get_args(VerifyMode)


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
        tables: dict[str, dict[str, object]] = {
            "target": {"name": self.target} if self.target else {},
            "verify": {},
            "instrument": {},
        }
        if self.verify is not None:
            tables["verify"]["mode"] = self.verify
        if self.tolerance is not None:
            tables["verify"].update(
                {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol, "half-rtol": self.tolerance.half_rtol}
            )
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
        if mode is not None and mode not in VERIFY_MODES:
            raise PipelineError(f"{origin} [verify] mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
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


def with_pass(passes: Sequence[Pass], added: Pass) -> list[Pass]:
    """``passes`` with ``added`` inserted before the first of them it must run before (its ``before``), else at
    the end: ``quantize`` into the ``cpu`` pipeline goes before its ``convert-layout``."""
    position = next((i for i, p in enumerate(passes) if p.name in added.before), len(passes))
    return [*passes[:position], added, *passes[position:]]


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
        p.check_later(passes[i + 1 :])
