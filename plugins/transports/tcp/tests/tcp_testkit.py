"""Helpers of the TCP transport tests: process entry points (spawn) on top of the core test kit."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import numpy as np

from llumnix_kv_core import wire
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import MP_BLOCK as BLOCK
from llumnix_kv_core.testing.frames import MP_BLOCKS as N_BLOCKS
from llumnix_kv_core.testing.frames import WAIT_S
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import expected_copy
from llumnix_kv_core.testing.frames import mp_expected_digest
from llumnix_kv_core.testing.frames import mp_plan
from llumnix_kv_core.testing.frames import pattern
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.frames import scatter_plan
from llumnix_kv_core.wire import Kind

__all__ = ["BLOCK", "N_BLOCKS", "WAIT_S", "Recorder", "expected_copy", "mp_expected_digest", "mp_plan",
           "raw_frame", "read_frame", "registered", "scatter_plan"]


def sender_main(q, seed: int) -> None:
    """Sender process: listen, answer a PULL with DATA + DONE on that channel, wait for the ACK."""
    from llumnix_kv_transport_tcp.transport import TcpTransport

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
                    ch.send_control(Kind.DONE, tid, {"bytes": sent, "segments": len(lengths)})
                except Exception as exc:
                    errors.append(repr(exc))
            threading.Thread(target=push, daemon=True).start()
        elif kind == Kind.ACK:
            acked.set()

    t = TcpTransport(TransportConfig(io_timeout_s=20.0))
    try:
        addr = t.listen("127.0.0.1", 0, Recorder(on_control_cb=on_control), MemoryRegistry())
        q.put(("addr", addr))
        ok = acked.wait(60.0)
        q.put(("sender", ok, errors))
    finally:
        t.close()


def receiver_main(q, address: str, connections: int) -> None:
    """Receiver process: register a buffer, connect, PULL, wait for DATA + DONE, ACK, report a digest."""
    from llumnix_kv_transport_tcp.transport import TcpTransport

    memory = MemoryRegistry()
    buf = registered(memory, 3, N_BLOCKS * BLOCK)
    rec = Recorder()
    t = TcpTransport(TransportConfig(io_timeout_s=20.0, connections_per_peer=connections))
    try:
        peer = t.connect(address, rec, memory)
        tid = wire.new_transfer_id()
        ch = peer.channel_for(7)
        ch.send_control(Kind.PULL, tid, {"region": 3})
        rec.wait(lambda r: r.data and any(k == Kind.DONE for _, k, _, _ in r.controls), 60.0)
        _, _, _, nbytes, nseg = rec.data[0]
        done = next(b for _, k, _, b in rec.controls if k == Kind.DONE)
        ch.send_control(Kind.ACK, tid, {"bytes": nbytes})
        q.put(("receiver", hashlib.sha256(buf.tobytes()).hexdigest(), nbytes, nseg, done))
        time.sleep(0.2)  # let the ACK leave before closing
    finally:
        t.close()


def stalled_sender_main(q, address: str, nbytes: int) -> None:
    """Connect and push one big DATA frame; the test kills this process while it is blocked."""
    from llumnix_kv_transport_tcp.transport import TcpTransport

    src = np.ones(nbytes, dtype=np.uint8)
    t = TcpTransport(TransportConfig(io_timeout_s=120.0, connections_per_peer=1))
    peer = t.connect(address, Recorder(), MemoryRegistry())
    q.put("sending")
    peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                               np.array([1], np.uint64), np.array([0], np.uint64),
                               np.array([nbytes], np.uint64))
    q.put("sent")
    time.sleep(60)
