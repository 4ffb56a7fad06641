"""Host memory between two processes through the shm transport, against memcpy of the same bytes.

Both host paths run: ``cma`` (one copy by the kernel into the receiver's registered memory) and
``ring`` (gather into the shared ring, scatter out of it, pipelined, one copy in each process).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.bench import WAIT_S
from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.bench.frames import FrameCounter
from llumnix_kv_core.bench.timing import median_copy
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id

GOAL = 0.80


def _config(path: str = "auto") -> TransportConfig:
    return TransportConfig(connect_timeout_s=30.0, io_timeout_s=60.0, connections_per_peer=1,
                           extra=(("host_path", path),))


def _receiver(address: str, nbytes: int, q: Any) -> None:
    """Child process: register a pre-faulted buffer, connect, ACK every frame until told to stop."""
    buf = np.ones(nbytes, dtype=np.uint8)  # written once: every page is present before timing
    memory = MemoryRegistry()
    memory.register(MemoryRegion(1, buf.ctypes.data, buf.nbytes))
    handler = FrameCounter(reply=True)
    transport = get_registry().transport("shm").factory(_config())
    try:
        peer = transport.connect(address, handler, memory)
        peer.channels[0].send_control(Kind.HELLO, bytes(16), {"ready": True})
        handler.wait(lambda: any(k == Kind.CANCEL for k, _ in handler.controls), "finish")
        q.put(("ok", int(buf[:: 1 << 20].sum())))
    except BaseException as exc:
        q.put(("error", repr(exc)))
    finally:
        transport.close()


def environment() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "native": native.implementation}


def run(sizes: list[int], total: int, repeat: int) -> list[dict[str, Any]]:
    src_buf = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    dst_local = np.ones(total, dtype=np.uint8)
    rows = []
    for path in ("cma", "ring"):
        rows += _run_path(path, sizes, total, repeat, src_buf, dst_local)
    return rows


def _run_path(path: str, sizes: list[int], total: int, repeat: int, src_buf: np.ndarray,
              dst_local: np.ndarray) -> list[dict[str, Any]]:
    threads = 1
    handler = FrameCounter()
    transport = get_registry().transport("shm").factory(_config(path))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rows = []
    try:
        address = transport.listen("127.0.0.1", 0, handler, MemoryRegistry())
        child = ctx.Process(target=_receiver, args=(address, total, q), daemon=True)
        child.start()
        handler.wait(lambda: any(k == Kind.HELLO for k, _ in handler.controls), "connect")
        ch = handler.channel
        one = np.array([total], np.uint64)
        ceiling = median_copy(np.array([src_buf.ctypes.data], np.uint64),
                              np.array([dst_local.ctypes.data], np.uint64), one, repeat, threads)
        for block in sizes:
            n = total // block
            rng = np.random.default_rng(block)
            src = np.uint64(src_buf.ctypes.data) + rng.permutation(n).astype(np.uint64) * np.uint64(block)
            dst_off = rng.permutation(n).astype(np.uint64) * np.uint64(block)
            lens = np.full(n, block, np.uint64)
            regions = np.ones(n, np.uint64)
            times = []
            for i in range(repeat + 1):
                with handler.cond:
                    handler.controls.clear()
                t0 = time.perf_counter()
                ch.send_data(new_transfer_id(), i, src, regions, dst_off, lens)
                handler.wait(lambda: any(k == Kind.ACK for k, _ in handler.controls), "acknowledge a frame")
                times.append(time.perf_counter() - t0)
            gather = median_copy(src, np.uint64(dst_local.ctypes.data) + dst_off, lens, repeat, threads)
            how = (f"one copy by the kernel, {os.cpu_count()} threads" if path == "cma" else
                   f"two pipelined copies, {threads} thread in each process")
            rows.append(rate_row(f"host-shm-{path}", block, n, n * block, statistics.median(times[1:]), ceiling,
                                 GOAL, note=f"{how}; ceiling: 1-thread memcpy of the same bytes; same-process "
                                            f"scattered 1-thread copy {n * block / gather / 1e9:.1f} GB/s"))
        ch.send_control(Kind.CANCEL, bytes(16))
        status, detail = q.get(timeout=WAIT_S)
        if status != "ok":
            msg = f"benchmark receiver failed: {detail}"
            raise RuntimeError(msg)
        child.join(30)
    finally:
        transport.close()
    return rows
