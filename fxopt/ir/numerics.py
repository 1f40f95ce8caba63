"""Numeric comparison of outputs: the tolerance exact rewrites and builds are held to, and relative errors.

Shared by the pass manager's verification, the backend's dispatch and the lossy passes' error measures, so it
lives with the IR, below both passes and codegen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

__all__ = ["Tolerance", "compare_outputs", "relative_rms_error"]


@dataclass(frozen=True)
class Tolerance:
    """How close an exact rewrite's outputs must stay to the original's.

    An output passes when ``max|out - ref| <= atol + rtol * max|ref|`` (the
    error relative to the output's scale); ``rtol`` is per output dtype.
    Integer and boolean outputs must match exactly.
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    half_rtol: float = 1e-2  # float16 / bfloat16 outputs

    def bound(self, reference: torch.Tensor) -> float:
        rtol = self.half_rtol if reference.dtype in (torch.float16, torch.bfloat16) else self.rtol
        scale = reference.abs().max().item() if reference.numel() else 0.0
        return self.atol + rtol * scale


def compare_outputs(
    outputs: Sequence, reference: Sequence, tolerance: Tolerance, *, allowance: Sequence[float] | None = None
) -> tuple[float, float, int | None]:
    """Largest absolute and scale-relative error over all outputs, and the first output index out of bound.

    ``allowance``: per output, an absolute error allowed on top of the tolerance's bound (for an integer
    output, how many units it may differ by: one quantization step where rounding may flip).
    """
    worst_abs = worst_rel = 0.0
    failing = None
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if not isinstance(ref, torch.Tensor):
            if out != ref and failing is None:
                failing = i
            continue
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            failing = i if failing is None else failing
            worst_abs = worst_rel = math.inf
            continue
        extra = allowance[i] if allowance is not None else 0.0
        if not ref.is_floating_point():
            exact = torch.equal(out, ref)
            err = 0.0 if exact else (float((out.long() - ref.long()).abs().max()) if extra else math.inf)
            bound = extra
            scale = 1.0
        else:
            diff = (out.double() - ref.double()).abs()
            err = diff.max().item() if diff.numel() else 0.0
            if math.isnan(err) or (torch.isnan(out) != torch.isnan(ref)).any():
                err = math.inf
            bound = tolerance.bound(ref) + extra
            scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale)
        if err > bound and failing is None:
            failing = i
    return worst_abs, worst_rel, failing


def relative_rms_error(outputs: list, reference: list) -> float:
    """``‖out - ref‖ / ‖ref‖`` over every floating output of every batch: the default error of ``scheme=mixed``."""
    pairs = [
        (o, r)
        for out, ref in zip(outputs, reference)
        for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref))
        if isinstance(r, torch.Tensor) and r.is_floating_point()
    ]
    signal = sum(float(r.double().square().sum()) for _, r in pairs)
    noise = sum(float((o.double() - r.double()).square().sum()) for o, r in pairs)
    return (noise / signal) ** 0.5 if signal > 0 else noise**0.5
