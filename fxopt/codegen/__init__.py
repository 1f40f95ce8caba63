"""Backends: turn an optimized :class:`~fxopt.ir.Program` into something callable.

The PyTorch backend runs the optimized graph itself; it is always available
and is the fallback of every target. The TVM (Relax) backend for ``cpu`` and
``cuda`` targets is tracked in issue #3; until it lands those targets run on
the PyTorch backend and :class:`Executable` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.ir.program import Program
from fxopt.targets import Target

__all__ = ["Executable", "build"]


@dataclass
class Executable:
    """A built model: call it with the model's arguments."""

    program: Program
    target: Target
    backend: str
    note: str

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.program(*args, **kwargs)


def build(program: Program, target: Target) -> Executable:
    """Build ``program`` for ``target``."""
    if target.kind == "torch":
        return Executable(program, target, "torch", "the optimized graph runs in PyTorch")
    device_note = ""
    if target.device == "cuda":
        if torch.cuda.is_available():
            program = program.to("cuda")
        else:
            device_note = "; no CUDA device is visible, so it runs on the CPU"
    return Executable(
        program, target, "torch",
        f"TVM codegen for target '{target}' is not available yet (issue #3): the optimized graph runs "
        f"in PyTorch{device_note}",
    )
