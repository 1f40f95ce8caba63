"""Compilation targets, created from short strings: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"cuda:sm_90"``, ``"aarch64"``."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from fxopt.errors import FxoptError

__all__ = ["Target", "TARGETS", "parse_target"]


@dataclass(frozen=True)
class Target:
    """Where the optimized model runs.

    ``kind`` picks the backend: ``"torch"`` runs the optimized graph in PyTorch;
    ``"llvm"`` and ``"cuda"`` are TVM targets. ``device`` is the PyTorch device
    the model's tensors live on. ``default_pipeline`` names the built-in
    pipeline used when the caller gives none.
    """

    name: str
    kind: Literal["torch", "llvm", "cuda"]
    device: str
    default_pipeline: str
    arch: str | None = None  # "sm_90" for CUDA; an LLVM triple for cross targets

    def __str__(self) -> str:
        return f"{self.name}:{self.arch}" if self.arch and self.kind == "cuda" else self.name


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("torch", "torch", "cpu", "torch"),
        Target("cpu", "llvm", "cpu", "cpu"),
        Target("cuda", "cuda", "cuda", "cuda"),
        Target("aarch64", "llvm", "cpu", "cpu", arch="aarch64-linux-gnu"),
    ]
}


def parse_target(spec: str | Target) -> Target:
    """Turn ``"cuda:sm_90"``-style text into a :class:`Target`; unknown names get close suggestions."""
    if isinstance(spec, Target):
        return spec
    name, _, arch = str(spec).partition(":")
    if name not in TARGETS:
        close = difflib.get_close_matches(name, list(TARGETS), n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FxoptError(f"unknown target '{spec}'{hint} (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    if arch:
        if target.kind != "cuda" or not re.fullmatch(r"sm_\d+a?", arch):
            raise FxoptError(f"target '{spec}': only cuda takes an architecture, written like cuda:sm_90")
        target = Target(target.name, target.kind, target.device, target.default_pipeline, arch)
    return target
