"""Measured dispatch: run each segment where it is faster, and only where TVM computes the same values.

For every segment the compiled TVM function is first checked against the
PyTorch subgraph on the segment's real inputs (recorded from the example
inputs), then both are timed on those inputs. Timing on a shared, noisy
machine decides nothing on one sample: each runner is timed in
:data:`ROUNDS` alternating warm blocks (the lower quartile of several calls
each, :func:`fxopt.timing.time_call`), and TVM is kept only when its best
block is at least :data:`MARGIN` faster than PyTorch's *and* it won every
round; when the rounds disagree they are timed once more, and otherwise
PyTorch, the plan that needs no build, stays. The statistics are the ones a
busy core does not flip: a thread that waits for the scheduler's next tick
makes some calls and some blocks whole ticks slower, never faster, so the
low calls and the best block are the kernel's own time.
Segments that compute the same thing on the same shapes (the layers of a
transformer) are timed once and decided alike. A TVM kernel already far
slower in the first round (an untuned convolution can be 40x slower) is not
timed again, so measuring a large model costs seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.quant.ops import WEIGHT_LEVELS
from fxopt.timing import time_call

__all__ = [
    "MARGIN",
    "ROUNDS",
    "Choice",
    "Timing",
    "choose",
    "device_sync",
    "measure",
    "measure_runners",
    "rounding_allowance",
    "BF16_STEP",
]

#: TVM must beat PyTorch by this factor to be chosen: below it, timing noise decides.
MARGIN = 0.9
#: Alternating timing blocks per runner; TVM must win each of them.
ROUNDS = 3
_BLOCK_SECONDS = 0.05


@dataclass
class Choice:
    """The dispatcher's decision for one segment, with the evidence."""

    backend: str  # "tvm" or "torch"
    torch_seconds: float | None
    tvm_seconds: float | None
    reason: str


@dataclass(frozen=True)
class Timing:
    """Two runners timed in alternating blocks: each one's best block, and how many blocks the second won."""

    first_seconds: float
    second_seconds: float
    second_wins: int
    rounds: int

    @classmethod
    def of(cls, first: Sequence[float], second: Sequence[float]) -> Timing:
        """From two runners' block times of one :func:`measure_runners` (a runner dropped after the first round
        has one: the rounds both ran count)."""
        wins = sum(b < a for a, b in zip(first, second))
        return cls(min(first), min(second), wins, min(len(first), len(second)))

    @property
    def second_is_faster(self) -> bool:
        return self.second_wins == self.rounds and self.second_seconds < MARGIN * self.first_seconds

    @property
    def rounds_disagree(self) -> bool:
        """The second runner won some rounds and lost others: noise decided some of them."""
        return 0 < self.second_wins < self.rounds


def device_sync(device: str) -> Callable[[], None]:
    """What waits for ``device`` to finish its queued work: timing a CUDA call without it times the launch."""
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def measure(
    first: Callable,
    second: Callable,
    args: tuple,
    *,
    sync: Callable[[], None] = lambda: None,
    rounds: int = ROUNDS,
    block_seconds: float = _BLOCK_SECONDS,
) -> Timing:
    """Time ``first(*args)`` and ``second(*args)`` in ``rounds`` alternating warm blocks (:func:`measure_runners`),
    and once more when the rounds disagree (the second timing decides)."""

    def timed() -> Timing:
        return Timing.of(*measure_runners([first, second], args, sync=sync, rounds=rounds, block_seconds=block_seconds))

    timing = timed()
    return timed() if timing.rounds_disagree else timing


def measure_runners(
    runners: Sequence[Callable],
    args: tuple,
    *,
    sync: Callable[[], None] = lambda: None,
    rounds: int = ROUNDS,
    block_seconds: float = _BLOCK_SECONDS,
) -> list[list[float]]:
    """Each runner's seconds per call (:func:`~fxopt.timing.time_call`) in each of ``rounds`` rounds of warm
    blocks, one block per runner in turn: several runners timed together cost one block each per round, not a
    pair of blocks per comparison.

    Alternating blocks, not single calls in turn: what one runner leaves behind (caches, thread pools) slows
    the call right after it; a block's lower quartile of at least 3 calls leaves that one out, so only the first
    round (first calls allocate) warms up untimed, which for a whole model on 2 cores saves seconds. The first runner
    is the baseline: a runner more than 3x slower than it in the first round is not timed again. Only there does
    one slow call end a block: in later rounds a block's first call can wait whole scheduler ticks for the
    threads the runner before it leaves spinning (PyTorch's OpenMP pool: a 0.1 ms TVM call took 8 ms), and a
    block ended by it would be that call.
    """
    samples: list[list[float]] = [[] for _ in runners]
    timed = list(range(len(runners)))
    for index in range(rounds):
        for i in timed:
            samples[i].append(
                time_call(
                    runners[i],
                    args,
                    sync=sync,
                    budget=block_seconds,
                    give_up_after=3 * samples[0][-1] if i and index == 0 else None,
                    warm_up=index == 0,
                )
            )
        if index == 0:
            timed = [i for i in timed if samples[i][0] <= 3 * samples[0][0]]
            if len(timed) == 1:
                break
    return samples


#: One bfloat16 step, relative to the value's magnitude at most: 8 significand bits, the first implicit.
BF16_STEP = 2.0**-7
#: What one of int8 attention's softmax weight levels moves its output by, relative to the output's magnitude at
#: most: a level of 255 against a row whose largest weight alone is 255 (the mean of V's values over the row's
#: levels moves by at most twice their magnitude over the levels' sum).
ATTENTION_LEVEL_STEP = 2.0 / WEIGHT_LEVELS


def rounding_allowance(graph_module: torch.fx.GraphModule, expected: Sequence) -> list[float]:
    """Per output of a segment, how far TVM's may stray from PyTorch's beyond the tolerance: one step (1) where
    ``fxopt.quantize`` produces it; for the float outputs of a segment with ``fxopt.linear_bf16`` layers one
    bfloat16 step of the output's scale, with ``fxopt.attention_q`` one softmax weight level's
    (:data:`ATTENTION_LEVEL_STEP`); else 0.

    A float input that differs from PyTorch's in its last bit (TVM's layer norm, GELU, a GEMM summing in
    another order, its ``exp``) can round to the neighbouring integer, bfloat16 value or weight level: that step
    is the bound there, not equality.
    """
    (outputs,) = graph_module.graph.output_node().args
    quantize = torch.ops.fxopt.quantize.default
    targets = {n.target for n in graph_module.graph.nodes}
    step = max(
        BF16_STEP if torch.ops.fxopt.linear_bf16.default in targets else 0.0,
        ATTENTION_LEVEL_STEP if torch.ops.fxopt.attention_q.default in targets else 0.0,
    )
    allowance = []
    for output, value in zip(cast(tuple, outputs), expected):
        if isinstance(output, torch.fx.Node) and output.target is quantize:
            allowance.append(1.0)
        elif step and isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            allowance.append(step * float(value.abs().max()))
        else:
            allowance.append(0.0)
    return allowance


def choose(
    torch_fn: torch.fx.GraphModule,
    tvm_fn: Callable,
    args: tuple,
    tolerance: Tolerance,
    *,
    device: str,
    measure_speed: bool = True,
    timed: Timing | None = None,
) -> tuple[Choice, Timing | None]:
    """Check ``tvm_fn`` against ``torch_fn`` on ``args`` and, with ``measure_speed``, keep the faster.

    ``timed``: the timing of an identical segment, reused instead of measuring again. Returns the choice and
    the timing it rests on.
    """
    with torch.no_grad():
        expected = torch_fn(*args)
        got = tvm_fn(*args)
    worst_abs, _, failing = compare_outputs(got, expected, tolerance, allowance=rounding_allowance(torch_fn, expected))
    if failing is not None:
        return Choice("torch", None, None, f"TVM's result differs from PyTorch's (max abs error {worst_abs:.3g})"), None
    if not measure_speed:
        return Choice("tvm", None, None, "TVM requested (dispatch='tvm')"), None
    if timed is None:
        with torch.no_grad():
            timed = measure(torch_fn, tvm_fn, args, sync=device_sync(device))
    t, v = timed.first_seconds, timed.second_seconds
    if timed.second_is_faster:
        return Choice("tvm", t, v, f"{t / v:.2f}x faster than PyTorch"), timed
    if v < t:
        return Choice(
            "torch", t, v, f"TVM not faster by the {1 / MARGIN:.2f}x margin in each of {timed.rounds} rounds"
        ), timed
    return Choice("torch", t, v, "PyTorch is faster"), timed
