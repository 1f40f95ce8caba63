"""Measured dispatch: run each segment where it is faster, and only where TVM computes the same values.

For every segment the compiled TVM function is first checked against the
PyTorch subgraph on the segment's real inputs (recorded from the example
inputs), then both are timed on those inputs; TVM is kept only when it is
correct and at least :data:`MARGIN` faster. Timing is median-of-runs after a
warm-up, and gives up early on a TVM kernel that is already far slower (an
untuned convolution can be 40x slower than PyTorch's), so measuring a large
model costs seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxopt.passes.manager import Tolerance, compare_outputs
from fxopt.timing import time_call

__all__ = ["MARGIN", "Choice", "choose"]

#: TVM must beat PyTorch by this factor to be chosen: below it, timing noise decides.
MARGIN = 0.95


@dataclass
class Choice:
    """The dispatcher's decision for one segment, with the evidence."""

    backend: str  # "tvm" or "torch"
    torch_seconds: float | None
    tvm_seconds: float | None
    reason: str


def choose(torch_fn: Callable, tvm_fn: Callable, args: tuple, tolerance: Tolerance, *, device: str,
           measure: bool = True) -> Choice:
    """Check ``tvm_fn`` against ``torch_fn`` on ``args`` and, with ``measure``, keep the faster."""
    with torch.no_grad():
        expected = torch_fn(*args)
        got = tvm_fn(*args)
    worst_abs, _, failing = compare_outputs(got, expected, tolerance)
    if failing is not None:
        return Choice("torch", None, None, f"TVM's result differs from PyTorch's (max abs error {worst_abs:.3g})")
    if not measure:
        return Choice("tvm", None, None, "TVM requested (dispatch='tvm')")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        torch_seconds = time_call(torch_fn, args, sync=sync)
        tvm_seconds = time_call(tvm_fn, args, sync=sync, give_up_after=3 * torch_seconds)
    if tvm_seconds < MARGIN * torch_seconds:
        return Choice("tvm", torch_seconds, tvm_seconds, f"{torch_seconds / tvm_seconds:.2f}x faster than PyTorch")
    return Choice("torch", torch_seconds, tvm_seconds, "PyTorch is faster")
