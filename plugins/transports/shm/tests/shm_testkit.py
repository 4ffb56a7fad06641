"""Helpers of the shm transport tests: process entry points (spawn) on top of the core test kit."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import MP_BLOCK as BLOCK
from llumnix_kv_core.testing.frames import MP_BLOCKS as N_BLOCKS
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import expected_copy
from llumnix_kv_core.testing.frames import mp_expected_digest
from llumnix_kv_core.testing.frames import mp_plan
from llumnix_kv_core.testing.frames import pattern
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.frames import scatter_plan
from llumnix_kv_core.wire import Kind

__all__ = ["BLOCK", "N_BLOCKS", "PATHS", "Recorder", "expected_copy", "mp_expected_digest", "mp_plan", "needs_cma",
           "read_frame", "registered", "ring_files", "scatter_plan"]

SMALL_RING = (("host_path", "ring"), ("slot_bytes", 1 << 20), ("slots", 3))
CMA = (("host_path", "cma"),)
needs_cma = pytest.mark.skipif(not native.has("cma"), reason="cross-memory copies need the compiled core")
PATHS = ["ring", pytest.param("cma", marks=needs_cma)]


def ring_files(pid: int | None = None, directory: str = "/dev/shm") -> list[str]:
    """Ring files of process ``pid`` (default: this one) still present in ``directory``."""
    prefix = f"llumnix-kv-{os.getpid() if pid is None else pid}-"
    return [f for f in os.listdir(directory) if f.startswith(prefix)]


def sender_main(q, seed: int, extra=SMALL_RING) -> None:
    """Listen, answer a PULL with DATA + DONE on that channel, wait for the ACK."""
    from llumnix_kv_transport_shm.transport import ShmTransport

    src = pattern(seed, N_BLOCKS * BLOCK)
    s_off, d_off, lengths = mp_plan(seed)
    base = np.uint64(src.ctypes.data)
    acked = threading.Event()
    errors: list[str] = []

    def on_control(ch: Channel, kind: Kind, tid: bytes, body: dict[str, Any]) -> None:
        if kind == Kind.PULL:
            def push() -> None:
                try:
                    regions = np.full(len(lengths), body["region"], dtype=np.uint64)
                    sent = ch.send_data(tid, 0, base + s_off, regions, d_off, lengths)
                    ch.send_control(Kind.DONE, tid, {"bytes": sent})
                except Exception as exc:
                    errors.append(repr(exc))
            threading.Thread(target=push, daemon=True).start()
        elif kind == Kind.ACK:
            acked.set()

    t = ShmTransport(TransportConfig(io_timeout_s=20.0, extra=extra))
    try:
        q.put(("addr", t.listen("127.0.0.1", 0, Recorder(on_control_cb=on_control), MemoryRegistry()), os.getpid()))
        q.put(("sender", acked.wait(60.0), errors))
    finally:
        t.close()


def receiver_main(q, address: str, connections: int) -> None:
    """Register a buffer, connect, PULL, wait for DATA + DONE, ACK, report a digest."""
    from llumnix_kv_transport_shm.transport import ShmTransport

    memory = MemoryRegistry()
    buf = registered(memory, 3, N_BLOCKS * BLOCK)
    rec = Recorder()
    t = ShmTransport(TransportConfig(io_timeout_s=20.0, connections_per_peer=connections, extra=SMALL_RING))
    try:
        peer = t.connect(address, rec, memory)
        tid = wire.new_transfer_id()
        ch = peer.channel_for(7)
        ch.send_control(Kind.PULL, tid, {"region": 3})
        rec.wait(lambda r: r.data and any(k == Kind.DONE for _, k, _, _ in r.controls), 60.0)
        _, _, _, nbytes, nseg = rec.data[0]
        ch.send_control(Kind.ACK, tid)
        q.put(("receiver", hashlib.sha256(buf.tobytes()).hexdigest(), nbytes, nseg))
        time.sleep(0.2)
    finally:
        t.close()


def stalled_sender_main(q, address: str, nbytes: int) -> None:
    """Connect and push one big DATA frame through a small ring; the test kills this process meanwhile."""
    from llumnix_kv_transport_shm.transport import ShmTransport

    src = np.ones(nbytes, dtype=np.uint8)
    t = ShmTransport(TransportConfig(io_timeout_s=120.0, connections_per_peer=1, extra=SMALL_RING))
    peer = t.connect(address, Recorder(), MemoryRegistry())
    q.put("sending")
    peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                               np.array([1], np.uint64), np.array([0], np.uint64), np.array([nbytes], np.uint64))
    q.put("sent")
    time.sleep(60)
