"""[7] Timing a kernel: the median of repeated calls after warm-up, with its spread.

``measurements()`` counts every ``time_call`` in this process, so a test can assert that a tuning
database hit ran no benchmark at all.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

_count = 0


@dataclass(frozen=True)
class Timing:
    """``median_s`` of ``samples`` (seconds per call); ``spread_s``: their interquartile range."""

    median_s: float
    spread_s: float
    samples: tuple[float, ...]


def measurements() -> int:
    """How many times ``time_call`` has run in this process."""
    return _count


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7,
              sync: Callable[[], object] | None = None, min_repeat: int = 3,
              budget_s: float = 2.0) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeat`` timed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so that asynchronous
    devices are timed to completion. Once ``min_repeat`` samples are in and ``budget_s`` seconds
    have been spent timing, it stops early, so a slow config does not stall the tune. Exceptions
    from ``fn`` propagate (the tuner scores them ``inf``).
    """
    global _count
    _count += 1
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeat and (len(samples) < min_repeat or spent < budget_s):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return Timing(statistics.median(samples), _iqr(samples), tuple(samples))


def _iqr(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q3 - q1
