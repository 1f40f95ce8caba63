"""Observers: the range each activation is quantized over, from calibration statistics.

``minmax`` keeps the running minimum and maximum (one pass over the
calibration data). ``percentile``, ``mse`` and ``entropy`` need the
distribution: a second pass fills a fixed histogram per value over the range
the first pass found, so memory stays at :data:`BINS` counts per observed
value however much data there is.

- ``percentile``: clip to the given percentile of the values (both tails);
- ``mse``: the range, shrunk toward zero, whose fake quantization of the
  histogram has the least squared error (rounding and clipping together);
- ``entropy``: TensorRT's calibration, the symmetric clip whose 128-level
  quantized distribution of ``|x|`` has the least KL divergence from the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.fx as fx

from fxopt.calibration import Calibration, observe
from fxopt.ir.program import Program
from fxopt.quant.formats import Format, affine_params, fake_quantize

__all__ = ["ObserverKind", "BINS", "calibrate_ranges", "histogram_range"]

ObserverKind = Literal["minmax", "percentile", "mse", "entropy"]

#: Histogram bins per observed value.
BINS = 2048
_ENTROPY_LEVELS = 128  # TensorRT's: the positive half of int8


def calibrate_ranges(
    program: Program,
    calibration: Calibration,
    nodes: Iterable[fx.Node],
    observer: ObserverKind,
    fmt: Format,
    *,
    symmetric: bool,
    percentile: float = 99.99,
    progress: Callable[[str], None] | None = None,
) -> dict[fx.Node, tuple[float, float]]:
    """The ``(lo, hi)`` range to quantize each of ``nodes`` over, by ``observer`` on ``calibration``."""
    nodes = list(nodes)
    lo = {n: float("inf") for n in nodes}
    hi = {n: float("-inf") for n in nodes}

    def extremes(node: fx.Node) -> Callable[[torch.Tensor], None]:
        def update(value: torch.Tensor) -> None:
            lo[node] = min(lo[node], float(value.min()))
            hi[node] = max(hi[node], float(value.max()))

        return update

    observe(program, calibration, {n: extremes(n) for n in nodes}, progress, "ranges")
    if observer == "minmax":
        return {n: (lo[n], hi[n]) for n in nodes}
    # Entropy looks at magnitudes only; the others at signed values.
    bounds = {n: (0.0, max(-lo[n], hi[n])) if observer == "entropy" else (lo[n], hi[n]) for n in nodes}
    counts = {n: torch.zeros(BINS, dtype=torch.float64) for n in nodes}

    def histogram(node: fx.Node) -> Callable[[torch.Tensor], None]:
        low, high = bounds[node]

        def update(value: torch.Tensor) -> None:
            values = value.float().abs() if observer == "entropy" else value.float()
            if high > low:
                counts[node] += torch.histc(values, BINS, low, high).double()

        return update

    observe(program, calibration, {n: histogram(n) for n in nodes}, progress, "histograms")
    chosen = {}
    for n in nodes:
        low, high = bounds[n]
        if high <= low:
            chosen[n] = (lo[n], hi[n])
        elif observer == "percentile":
            chosen[n] = _percentile(counts[n], low, high, percentile)
        elif observer == "mse":
            chosen[n] = _least_error(counts[n], low, high, fmt, symmetric)
        else:
            threshold = _entropy_threshold(counts[n], high)
            chosen[n] = (max(lo[n], -threshold), min(hi[n], threshold))
    return chosen


def histogram_range(counts: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Centers of the histogram's bins over ``[lo, hi]``."""
    width = (hi - lo) / len(counts)
    return lo + width * (torch.arange(len(counts), dtype=torch.float64) + 0.5)


def _percentile(counts: torch.Tensor, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    centers = histogram_range(counts, lo, hi)
    cumulative = counts.cumsum(0) / counts.sum()
    tail = 1 - percentile / 100
    low = centers[int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))]
    high = centers[
        min(int(torch.searchsorted(cumulative, torch.tensor(1 - tail, dtype=torch.float64))), len(counts) - 1)
    ]
    return min(float(low), 0.0) if lo < 0 else lo, max(float(high), 0.0) if hi > 0 else hi


def _least_error(counts: torch.Tensor, lo: float, hi: float, fmt: Format, symmetric: bool) -> tuple[float, float]:
    """Shrink ``[lo, hi]`` by the factor whose fake quantization of the histogram has the least squared error."""
    centers = histogram_range(counts, lo, hi).float()
    best, best_error = (lo, hi), float("inf")
    for fraction in torch.linspace(0.2, 1.0, 81).tolist():
        scale, zero_point = affine_params(torch.tensor(lo * fraction), torch.tensor(hi * fraction), fmt, symmetric)
        error = float((counts * (fake_quantize(centers, scale, zero_point, fmt) - centers).double().square()).sum())
        if error < best_error:
            best, best_error = (lo * fraction, hi * fraction), error
    return best


def _entropy_threshold(counts: torch.Tensor, amax: float) -> float:
    """TensorRT's KL-divergence threshold on a histogram of ``|x|`` over ``[0, amax]``."""
    width = amax / len(counts)
    best, best_divergence = amax, float("inf")
    for stop in range(_ENTROPY_LEVELS, len(counts) + 1, 16):
        reference = counts[:stop].clone()
        reference[-1] += counts[stop:].sum()  # values beyond the clip saturate into the last bin
        if reference.sum() == 0:
            continue
        # Merge the kept bins into the available levels, then spread each level evenly over its non-empty bins.
        expanded = torch.cat(
            [
                torch.where(present, chunk.sum() / max(int(present.sum()), 1), torch.zeros_like(chunk))
                for chunk, present in zip(
                    torch.tensor_split(counts[:stop], _ENTROPY_LEVELS),
                    torch.tensor_split(reference > 0, _ENTROPY_LEVELS),
                )
            ]
        )
        p = reference / reference.sum()
        q = expanded.clamp_min(1e-8 * float(expanded.sum()) + 1e-30)  # smoothed: no empty level where p has mass
        q = q / q.sum()
        support = p > 0
        divergence = float((p[support] * (p[support] / q[support]).log()).sum())
        if divergence < best_divergence:
            best, best_divergence = stop * width, divergence
    return best
