"""GPU <-> pinned host copies of scattered blocks (what offloading moves), against a contiguous pinned copy.

No transport is involved: a transport's GPU bench runs these cases on the device pool it allocated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.bench.timing import device_time
from llumnix_kv_core.bench.timing import pick

GOAL_HOST = 0.90
HOST_CAP = 4 << 30  # pinned bytes per host case


def host_cases(cuda: Any, stream: int, src_pool: int, pool_bytes: int, sizes: list[int], blocks: int, repeat: int,
               rng: np.random.Generator) -> list[dict[str, Any]]:
    """d2h and h2d rows per block size: the kernel and the copy engines' batched API, one launch each."""
    rows = []
    host_bytes = min(pool_bytes, HOST_CAP)
    pinned = cuda.malloc_host(host_bytes)
    try:
        for block in sizes:
            n = min(blocks, host_bytes // block)
            nbytes, b = n * block, np.uint64(block)
            dev = np.uint64(src_pool) + pick(rng, pool_bytes // block, n) * b
            host = np.uint64(pinned) + pick(rng, host_bytes // block, n) * b
            lens = np.full(n, block, np.uint64)
            for case, s, d, to, frm in (("d2h", dev, host, pinned, src_pool), ("h2d", host, dev, src_pool, pinned)):
                goal = GOAL_HOST if case == "d2h" else None
                ceiling = device_time(cuda, stream, repeat, cuda.memcpy_async, to, frm, nbytes)
                k = device_time(cuda, stream, repeat, cuda.copy_segments, s, d, lens)
                rows.append(rate_row(f"{case}-kernel", block, n, nbytes, k, ceiling, goal,
                                     "scattered blocks, one launch vs contiguous pinned copy"))
                try:
                    ce = device_time(cuda, stream, repeat, cuda.copy_segments_ce, s, d, lens)
                    rows.append(rate_row(f"{case}-copy-engines", block, n, nbytes, ce, ceiling, goal,
                                         "scattered blocks, cudaMemcpyBatchAsync vs contiguous pinned copy"))
                except RuntimeError as exc:
                    rows.append({"case": f"{case}-copy-engines", "block_bytes": block, "note": f"failed: {exc}"})
    finally:
        cuda.free_host(pinned)
    return rows
