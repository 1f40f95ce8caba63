"""What an ``optimize`` run did: capture, each pass, the backend, and the error against the original."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fxopt.codegen import SegmentRecord
from fxopt.passes.manager import PassRecord
from fxopt.tables import format_table

__all__ = ["Report", "human"]


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


@dataclass
class Report:
    """The per-pass table of an optimization, printable and serializable (``to_dict``)."""

    model: str
    target: str
    backend: str
    backend_note: str
    pipeline: str
    verify: str
    capture_seconds: float
    capture_error: tuple[float, float] | None
    passes: list[PassRecord] = field(default_factory=list)
    build_seconds: float = 0.0
    build_error: tuple[float, float] | None = None  # the built model against the original
    segments: list[SegmentRecord] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    tuning: str = ""
    latency: tuple[float, float] | None = None  # ms on the example inputs: all in PyTorch, as built

    @property
    def final_error(self) -> tuple[float, float] | None:
        if self.build_error is not None:
            return self.build_error
        checked = [pair for r in self.passes if (pair := _pair(r.max_abs_error, r.max_rel_error)) is not None]
        if checked:
            return checked[-1]
        return self.capture_error

    def to_dict(self) -> dict:
        data = asdict(self)
        data["final_error"] = self.final_error
        return data

    def __str__(self) -> str:
        header = ["pass", "time", "changed", "nodes", "params", "FLOPs", "max abs err", "max rel err"]
        rows = [["capture", f"{self.capture_seconds:.2f}s", "", "", "", "", *_errors(self.capture_error)]]
        for r in self.passes:
            rows.append(
                [
                    r.name,
                    f"{r.seconds:.2f}s",
                    "yes" if r.changed else "no",
                    _change(r.nodes),
                    _change(r.params, human),
                    _change(r.flops, human),
                    *_errors(_pair(r.max_abs_error, r.max_rel_error)),
                ]
            )
        if self.build_seconds:
            rows.append(
                [f"build ({self.backend})", f"{self.build_seconds:.2f}s", "", "", "", "", *_errors(self.build_error)]
            )
        lines = [
            f"fxopt report: {self.model} -> target {self.target}",
            f"backend: {self.backend} ({self.backend_note})",
            f"pipeline: {self.pipeline or '(empty)'}",
            f"verification: {self.verify}",
            "",
            *format_table(header, rows),
        ]
        if self.tuning:
            lines += ["", self.tuning]
        if self.latency:
            eager, built = self.latency
            lines += [
                "",
                f"latency on the example inputs: {eager:.3f} ms in PyTorch -> {built:.3f} ms as built "
                f"({eager / built:.2f}x; medians of alternating warm blocks)",
            ]
        if self.segments:
            lines += ["", "segments (measured on the example inputs):"]
            lines += [
                "  " + line
                for line in format_table(
                    ["segment", "ops", "runs in", "torch ms", "tvm ms", "why"],
                    [
                        [s.name, _shorten(s.ops, 48), s.backend, _format_ms(s.torch_ms), _format_ms(s.tvm_ms), s.reason]
                        for s in self.segments
                    ],
                )
            ]
        if self.fallbacks:
            lines += ["", "ops left to PyTorch (no TVM lowering):"] + [f"  {f}" for f in self.fallbacks]
        notes = [(r.name, n) for r in self.passes for n in r.notes]
        if any(any(r.stats.values()) for r in self.passes):
            lines += ["", "what each pass did:"]
            lines += [
                f"  {r.name}: " + ", ".join(_stat(k, v, r.rules) for k, v in r.stats.items() if v)
                for r in self.passes
                if any(r.stats.values())
            ]
        if notes:
            lines += ["", "notes:"] + [f"  {name}: {n}" for name, n in notes]
        return "\n".join(lines)


def _stat(key: str, value: object, rules: dict[str, str]) -> str:
    """``folded=3``, or for a rule's hits ``fold-bn-after-conv=3 (fold_conv_bn.py:120)``."""
    return f"{key}={value}" + (f" ({rules[key]})" if key in rules else "")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _change(pair: tuple[int, int], fmt=str) -> str:
    before, after = pair
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def _pair(abs_error: float | None, rel_error: float | None) -> tuple[float, float] | None:
    return None if abs_error is None or rel_error is None else (abs_error, rel_error)


def _errors(error: tuple[float, float] | None) -> list[str]:
    if error is None:
        return ["-", "-"]
    return [f"{error[0]:.2e}", f"{error[1]:.2e}"]
