"""Wall-clock measurement shared by the passes that measure (latency-aware pruning) and by codegen's dispatch."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["time_call"]


def time_call(
    fn: Callable,
    args: tuple = (),
    *,
    sync: Callable[[], None] = lambda: None,
    budget: float = 0.2,
    give_up_after: float | None = None,
    warm_up: bool = True,
) -> float:
    """Median seconds per call of ``fn(*args)`` after one warm-up call (``warm_up``).

    Runs at least 3 and at most 100 times, within about ``budget`` seconds;
    returns after a single timed run when that run exceeds ``give_up_after``.
    ``sync`` waits for the device (``torch.cuda.synchronize``) around each run.
    """
    if warm_up:
        fn(*args)
        sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget and len(times) < 100):
        start = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - start)
        if give_up_after is not None and times[-1] > give_up_after:
            break
    return statistics.median(times)
