"""[7] Timing a kernel: the median of repeated calls after warm-up, with its spread.

``measurements()`` counts every ``time_call`` in this process, so a test can assert that a tuning
database hit ran no benchmark at all.

Steady allocator. With glibc's default malloc, a temporary of 128 KiB or more is mmap'd and
unmapped on every call (the dynamic threshold only rises past a size once a chunk *larger* than it
is freed), so a kernel with big tiles takes page faults per call, as many as what the process
allocated before dictates: timings would depend on which configs ran earlier. ``time_call``
therefore first calls ``steady_allocator()``, which fixes glibc's mmap and trim thresholds for the
process (``mallopt``), so large temporaries are reused from the heap. It is process-wide and
permanent (glibc cannot return to its dynamic mode); the cost is that up to ``TRIM_BYTES`` of
freed memory stays with the process. Set ``ATTNCC_STEADY_MALLOC=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

_count = 0
_steady: bool | None = None

#: glibc mallopt parameters and the values ``steady_allocator`` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_BYTES, TRIM_BYTES = 32 << 20, 256 << 20


@dataclass(frozen=True)
class Timing:
    """``median_s`` of ``samples`` (seconds per call); ``spread_s``: their interquartile range."""

    median_s: float
    spread_s: float
    samples: tuple[float, ...]


def measurements() -> int:
    """How many times ``time_call`` has run in this process."""
    return _count


def steady_allocator() -> bool:
    """Fix glibc's mmap/trim thresholds once per process (module docstring); whether they are set.

    False (and nothing changed) off Linux/glibc or with ``ATTNCC_STEADY_MALLOC=0``.
    """
    global _steady
    if _steady is None:
        _steady = False
        if sys.platform.startswith("linux") and os.environ.get("ATTNCC_STEADY_MALLOC") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc: no mallopt to call
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _steady = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)
                           and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    return _steady


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7,
              sync: Callable[[], object] | None = None, min_repeat: int = 3,
              budget_s: float = 2.0) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeat`` timed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so that asynchronous
    devices are timed to completion. Once ``min_repeat`` samples are in and ``budget_s`` seconds
    have been spent timing, it stops early, so a slow config does not stall the tune. The first
    call in a process fixes the allocator (``steady_allocator``, module docstring). Exceptions
    from ``fn`` propagate (the tuner scores them ``inf``).
    """
    global _count
    _count += 1
    steady_allocator()
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
