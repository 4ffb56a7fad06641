"""Host memory between two processes through the shm transport, against memcpy of the same bytes.

Both host paths run: ``cma`` (one copy by the kernel into the receiver's registered memory) and
``ring`` (gather into the shared ring, scatter out of it, pipelined, one copy in each process).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id

GOAL = 0.80
WAIT_S = 120.0


class _Counter(FrameHandler):
    def __init__(self, reply: bool) -> None:
        self.cond = threading.Condition()
        self.frames = 0
        self.reply = reply
        self.controls: list[tuple[Kind, dict[str, Any]]] = []
        self.channel: Channel | None = None

    def accept_data(self, transfer_id: bytes, layer: int) -> bool:
        return True

    def on_data(self, channel: Channel, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        if self.reply:
            channel.send_control(Kind.ACK, transfer_id, {"layer": layer})
        with self.cond:
            self.frames += 1
            self.cond.notify_all()

    def on_control(self, channel: Channel, kind: Kind, transfer_id: bytes, body: dict[str, Any]) -> None:
        with self.cond:
            self.channel = channel
            self.controls.append((kind, body))
            self.cond.notify_all()

    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, WAIT_S):
                msg = f"benchmark peer did not {what} within {WAIT_S:.0f} s"
                raise TimeoutError(msg)


def _config(path: str = "auto") -> TransportConfig:
    return TransportConfig(connect_timeout_s=30.0, io_timeout_s=60.0, connections_per_peer=1,
                           extra=(("host_path", path),))


def _receiver(address: str, nbytes: int, q: Any) -> None:
    """Child process: register a pre-faulted buffer, connect, ACK every frame until told to stop."""
    buf = np.ones(nbytes, dtype=np.uint8)  # written once: every page is present before timing
    memory = MemoryRegistry()
    memory.register(MemoryRegion(1, buf.ctypes.data, buf.nbytes))
    handler = _Counter(reply=True)
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


def _median_copy(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, repeat: int, threads: int) -> float:
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        native.copy_segments(src, dst, lengths, threads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


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
    handler = _Counter(reply=False)
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
        ceiling = _median_copy(np.array([src_buf.ctypes.data], np.uint64),
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
            gather = _median_copy(src, np.uint64(dst_local.ctypes.data) + dst_off, lens, repeat, threads)
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
