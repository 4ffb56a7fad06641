"""Timing of copies, the ceilings benchmarks compare against: host memcpy, and CUDA device time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.bench import MIB


def median_copy(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, repeat: int, threads: int) -> float:
    """Median seconds of one ``native.copy_segments`` of these segments in this process (one warm-up)."""
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        native.copy_segments(src, dst, lengths, threads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def device_time(cuda: Any, stream: int, repeat: int, fn: Callable[..., None], *args: Any) -> float:
    """Median seconds of ``fn(*args, stream)``'s work on ``stream``, timed with CUDA events (one warm-up).

    A short spin kernel is queued first, so the start event fires once the copy is already queued:
    the time is the copy's, not the host's time to build and submit it.
    """
    start, end = cuda.event_create_timed(), cuda.event_create_timed()
    try:
        fn(*args, stream)
        cuda.synchronize(stream)
        times = []
        for _ in range(repeat):
            cuda.spin(300_000, 1, stream)
            cuda.event_record(start, stream)
            fn(*args, stream)
            cuda.event_record(end, stream)
            cuda.event_synchronize(end)
            times.append(cuda.event_elapsed_ms(start, end) / 1e3)
        return statistics.median(times)
    finally:
        cuda.event_destroy(start)
        cuda.event_destroy(end)


def fill_random(cuda: Any, addr: int, nbytes: int) -> None:
    """Random bytes into device memory at ``addr`` (so no copy can profit from zero pages)."""
    chunk = np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8)
    for off in range(0, nbytes, chunk.nbytes):
        cuda.memcpy_htod(addr + off, chunk.ctypes.data, min(chunk.nbytes, nbytes - off))


def pick(rng: np.random.Generator, slots: int, n: int) -> np.ndarray:
    """``n`` distinct slot indices out of ``slots``, in random order (scattered blocks)."""
    return np.sort(rng.choice(slots, size=n, replace=False)).astype(np.uint64)[rng.permutation(n)]
