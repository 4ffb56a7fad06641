"""What the DATA digests cost: XXH3-64 throughput against memcpy of the same bytes, and tcp loopback
transfers with ``digest`` on against off, all measured in the same run.

    python benchmarks/bench_digest.py                  # -> results/digest.json
    LLUMNIX_KV_NATIVE=0 python benchmarks/bench_digest.py --mib 64 --out benchmarks/results/digest-numpy.json

Digest rows: one core hashes scattered segments of the given size (``native.digest_segments``); the
ceiling is a one-thread ``native.copy_segments`` of the same segments. Transfer rows: one tcp
connection over loopback carries frames of 256 KiB segments into a registered region (sender and
receiver threads of this process); the ceiling of the digest-on row is the digest-off row's rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from llumnix_kv_transport_tcp.transport import TcpTransport

from llumnix_kv_core import native
from llumnix_kv_core.bench import KIB
from llumnix_kv_core.bench import MIB
from llumnix_kv_core.bench import new_result
from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.bench import report
from llumnix_kv_core.bench.frames import FrameCounter
from llumnix_kv_core.bench.timing import median_copy
from llumnix_kv_core.bench.timing import pick
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import new_transfer_id

SEGMENT_SIZES = (4 * KIB, 64 * KIB, 2 * MIB)
FRAME_SEGMENTS = 64  # segments of 256 KiB per transfer frame: 16 MiB frames
TRANSFER_SEGMENT = 256 * KIB


def median_digest(addrs: np.ndarray, lengths: np.ndarray, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        native.digest_segments(addrs, lengths)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def digest_rows(total: int, repeat: int) -> list[dict]:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, total, dtype=np.uint8)
    dst = np.empty_like(src)
    rows = []
    for seg in SEGMENT_SIZES:
        n = total // seg
        slots = pick(rng, n, n) * np.uint64(seg)  # every slot, in random order
        lengths = np.full(n, seg, dtype=np.uint64)
        s, d = slots + np.uint64(src.ctypes.data), slots + np.uint64(dst.ctypes.data)
        copy_s = median_copy(s, d, lengths, repeat, 1)
        digest_s = median_digest(s, lengths, repeat)
        rows.append(rate_row("xxh3-64 digest, 1 core", seg, n, n * seg, digest_s, copy_s, None,
                             "ceiling: memcpy of the same segments, 1 thread"))
    return rows


def transfer_seconds(digest: bool, total: int, repeat: int) -> float:
    """Median seconds to move ``total`` bytes over one tcp loopback connection (after one warm-up)."""
    config = TransportConfig(connect_timeout_s=10.0, io_timeout_s=60.0, connections_per_peer=1, digest=digest)
    server, client = TcpTransport(config), TcpTransport(config)
    try:
        memory = MemoryRegistry()
        dst = np.zeros(total, dtype=np.uint8)
        memory.register(MemoryRegion(1, dst.ctypes.data, dst.nbytes))
        counter = FrameCounter()
        peer = client.connect(server.listen("127.0.0.1", 0, counter, memory), FrameCounter(), MemoryRegistry())
        src = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
        n = total // TRANSFER_SEGMENT
        offsets = np.arange(n, dtype=np.uint64) * np.uint64(TRANSFER_SEGMENT)
        lengths = np.full(n, TRANSFER_SEGMENT, dtype=np.uint64)
        regions = np.ones(n, dtype=np.uint64)
        chan, times, sent = peer.channels[0], [], 0
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            tid = new_transfer_id()
            for lo in range(0, n, FRAME_SEGMENTS):
                hi = min(n, lo + FRAME_SEGMENTS)
                chan.send_data(tid, 1, offsets[lo:hi] + np.uint64(src.ctypes.data), regions[lo:hi], offsets[lo:hi],
                               lengths[lo:hi])
                sent += 1
            counter.wait(lambda want=sent: counter.frames >= want, "the frames to arrive")
            times.append(time.perf_counter() - t0)
        if counter.failures or not np.array_equal(src, dst):
            msg = f"the transfer was not byte-exact (failures: {counter.failures[:1]})"
            raise RuntimeError(msg)
        return statistics.median(times[1:])
    finally:
        client.close()
        server.close()


def transfer_rows(total: int, repeat: int) -> list[dict]:
    off = transfer_seconds(False, total, repeat)
    on = transfer_seconds(True, total, repeat)
    n = total // TRANSFER_SEGMENT
    return [rate_row("tcp loopback, digest off", TRANSFER_SEGMENT, n, total, off, None, None, "1 connection"),
            rate_row("tcp loopback, digest on", TRANSFER_SEGMENT, n, total, on, off, None,
                     "ceiling: digest off, same run")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes hashed and moved per case, in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "digest.json")
    args = ap.parse_args()
    total = args.mib * MIB
    result = new_result()
    result["implementation"] = native.implementation
    result["rows"] = digest_rows(total, args.repeat) + transfer_rows(total, args.repeat)
    report(result, args.out)


if __name__ == "__main__":
    main()
