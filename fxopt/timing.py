"""Wall-clock measurement shared by the passes that measure (latency-aware pruning) and by codegen's dispatch."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

__all__ = ["time_call", "OtherLoad"]


def time_call(
    fn: Callable,
    args: tuple = (),
    *,
    sync: Callable[[], None] = lambda: None,
    budget: float = 0.2,
    give_up_after: float | None = None,
    warm_up: bool = True,
) -> float:
    """Seconds per call of ``fn(*args)``, the lower quartile of a block of calls, after one warm-up call
    (``warm_up``).

    Runs at least 3 and at most 100 times, within about ``budget`` seconds;
    returns after a single timed run when that run exceeds ``give_up_after``.
    ``sync`` waits for the device (``torch.cuda.synchronize``) around each run.
    The lower quartile, not the median: on a busy machine a call whose thread
    waited for the scheduler's next tick (4 ms at 250 Hz) costs whole ticks
    more, and when half of a block's calls wait the median is one of them.
    Nothing makes a call faster than its work, so the low calls are the work.
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
    return sorted(times)[(len(times) - 1) // 4]


class OtherLoad:
    """How many cores other processes have kept busy since this object was made (Linux: ``/proc/stat`` less this
    process's own CPU time; ``None`` elsewhere). A timing taken while they used a core is not a quiet machine's:
    the threads of a parallel kernel wait for that core."""

    def __init__(self) -> None:
        self._start = (time.perf_counter(), _busy_seconds(), _own_seconds())

    def cores(self) -> float | None:
        wall, busy, own = self._start
        now_busy, elapsed = _busy_seconds(), time.perf_counter() - wall
        if busy is None or now_busy is None or elapsed <= 0:
            return None
        return max(0.0, (now_busy - busy - (_own_seconds() - own)) / elapsed)


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent (user, nice, system, irq, softirq, steal), or None without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(n) for n in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
