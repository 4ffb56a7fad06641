"""Conformance between processes (spawned): a pull answered with DATA + DONE and acknowledged; a sender
killed in the middle of a frame.

The functions ending in ``_main`` are the children's entry points. They live in this installed
module so a spawned child imports them by name, whatever way pytest imported the test file;
the transport comes with them as a pickled :class:`~llumnix_kv_core.testing.transport.base.TransportSpec`.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import re
import threading
import time
from typing import Any

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import MP_BLOCK
from llumnix_kv_core.testing.frames import MP_BLOCKS
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import mp_expected_digest
from llumnix_kv_core.testing.frames import mp_plan
from llumnix_kv_core.testing.frames import pattern
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.transport.base import ConformanceBase
from llumnix_kv_core.testing.transport.base import TransportSpec
from llumnix_kv_core.testing.transport.base import one_segment
from llumnix_kv_core.wire import Kind

CTX = mp.get_context("spawn")
WAIT_S = 60.0
KILLED_FRAME_BYTES = 96 << 20  # more than socket buffers and rings hold: the sender blocks mid-frame


def sender_main(q: Any, spec: TransportSpec, seed: int) -> None:
    """Listen, answer a PULL with DATA + DONE on that channel, wait for the ACK."""
    src = pattern(seed, MP_BLOCKS * MP_BLOCK)
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

    t = spec.build(io_timeout_s=20.0)
    try:
        addr = t.listen("127.0.0.1", 0, Recorder(on_control_cb=on_control), MemoryRegistry())
        q.put(("addr", addr, os.getpid()))
        q.put(("sender", acked.wait(WAIT_S), errors))
    finally:
        t.close()


def receiver_main(q: Any, spec: TransportSpec, address: str, connections: int) -> None:
    """Register a buffer, connect, PULL, wait for DATA + DONE, ACK, report a digest."""
    memory = MemoryRegistry()
    buf = registered(memory, 3, MP_BLOCKS * MP_BLOCK)
    rec = Recorder()
    t = spec.build(io_timeout_s=20.0, connections_per_peer=connections)
    try:
        peer = t.connect(address, rec, memory)
        tid = wire.new_transfer_id()
        ch = peer.channel_for(7)
        ch.send_control(Kind.PULL, tid, {"region": 3})
        rec.wait(lambda r: r.data and any(k == Kind.DONE for _, k, _, _ in r.controls), WAIT_S)
        _, _, _, nbytes, nseg = rec.data[0]
        done = next(b for _, k, _, b in rec.controls if k == Kind.DONE)
        ch.send_control(Kind.ACK, tid, {"bytes": nbytes})
        q.put(("receiver", hashlib.sha256(buf.tobytes()).hexdigest(), nbytes, nseg, done, os.getpid()))
        time.sleep(0.2)  # let the ACK leave before closing
    finally:
        t.close()


def stalled_sender_main(q: Any, spec: TransportSpec, address: str, nbytes: int) -> None:
    """Connect and push one big DATA frame; the test kills this process while it is blocked."""
    src = np.ones(nbytes, dtype=np.uint8)
    t = spec.build(io_timeout_s=120.0, connections_per_peer=1)
    peer = t.connect(address, Recorder(), MemoryRegistry())
    q.put("sending")
    peer.channels[0].send_data(wire.new_transfer_id(), 0, *one_segment(src, 1))
    q.put("sent")
    time.sleep(60)


def _get(q: Any, what: str) -> Any:
    try:
        return q.get(timeout=WAIT_S)
    except queue.Empty:
        pytest.fail(f"no {what} message within {WAIT_S} s")


def _reap(*procs: Any) -> None:
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


class ProcessTests(ConformanceBase):
    @pytest.mark.parametrize("connections", [1, 4])
    def test_pull_data_done_ack_between_processes(self, connections):
        self.require("supports_processes")
        seed = 1234 + connections
        spec = self.spec()
        q = CTX.Queue()
        sender = CTX.Process(target=sender_main, args=(q, spec, seed), daemon=True)
        sender.start()
        receiver = None
        try:
            tag, addr, sender_pid = _get(q, "address")
            assert tag == "addr"
            receiver = CTX.Process(target=receiver_main, args=(q, spec, addr, connections), daemon=True)
            receiver.start()
            got = {}
            for _ in range(2):
                msg = _get(q, "completion")
                got[msg[0]] = msg[1:]
            digest, nbytes, nseg, done, receiver_pid = got["receiver"]
            _, _, lengths = mp_plan(seed)
            assert nseg == MP_BLOCKS
            assert nbytes == int(lengths.sum()) == done["bytes"]
            assert digest == mp_expected_digest(seed), "receiver memory differs from the pattern"
            acked, errors = got["sender"]
            assert acked, "the sender never saw the receiver's ACK"
            assert errors == []
        finally:
            _reap(sender, *([receiver] if receiver else []))
        assert sender.exitcode == 0
        assert receiver.exitcode == 0
        self.check_process_left_nothing(sender_pid)
        self.check_process_left_nothing(receiver_pid)

    def test_sender_killed_mid_frame(self, make_transport):
        """The receiver reports the cut frame through on_closed (no hang, no on_data) and keeps listening."""
        self.require("supports_processes")
        memory = MemoryRegistry()
        buf = registered(memory, 1, KILLED_FRAME_BYTES)
        q = CTX.Queue()
        gate = threading.Event()

        def accept(_tid: bytes, _layer: int, _epoch: int) -> bool:
            q.put("accepting")
            gate.wait(WAIT_S)  # hold the payload back until the sender is dead
            return True

        handler = Recorder(accept_cb=accept)
        srv = make_transport(io_timeout_s=30.0)
        addr = srv.listen("127.0.0.1", 0, handler, memory)
        p = CTX.Process(target=stalled_sender_main, args=(q, self.spec(), addr, KILLED_FRAME_BYTES), daemon=True)
        p.start()
        try:
            # header and table are in, the payload is pending
            assert {_get(q, "sending"), _get(q, "accepting")} == {"sending", "accepting"}
            p.kill()
            p.join(10)
            gate.set()
            handler.wait(lambda r: len(r.closed) == 1, timeout=WAIT_S)
        finally:
            gate.set()
            _reap(p)
        _, err = handler.closed[0]
        assert isinstance(err, TransferError)
        assert re.search(self.killed_sender_error, str(err)), err
        assert not handler.data
        assert buf[-1] == 0  # the frame never completed
        assert np.count_nonzero(buf) < KILLED_FRAME_BYTES
        self.check_process_left_nothing(p.pid)

        # the listener still serves
        cli = make_transport(connections_per_peer=1)
        peer = cli.connect(addr, Recorder(), MemoryRegistry())
        src = np.full(16, 9, np.uint8)
        peer.channels[0].send_data(b"\x05" * 16, 0, *one_segment(src, 1))
        handler.wait(lambda r: len(r.data) == 1)
        assert (buf[:16] == 9).all()
