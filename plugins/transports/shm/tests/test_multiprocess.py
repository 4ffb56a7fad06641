"""Sender and receiver in separate processes (spawn): real shared memory between real processes."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading

import numpy as np
import pytest
import shm_testkit
from shm_testkit import Recorder
from shm_testkit import registered
from shm_testkit import ring_files

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegistry

CTX = mp.get_context("spawn")
WAIT_S = 60.0


def _get(q, what: str):
    try:
        return q.get(timeout=WAIT_S)
    except queue.Empty:
        pytest.fail(f"no {what} message within {WAIT_S} s")


def _reap(*procs) -> None:
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


@pytest.mark.parametrize("path", shm_testkit.PATHS)
@pytest.mark.parametrize("connections", [1, 4])
def test_pull_data_done_ack_between_processes(connections, path):
    seed = 4321 + connections
    q = CTX.Queue()
    extra = shm_testkit.SMALL_RING if path == "ring" else shm_testkit.CMA
    sender = CTX.Process(target=shm_testkit.sender_main, args=(q, seed, extra), daemon=True)
    sender.start()
    receiver = None
    try:
        tag, addr, sender_pid = _get(q, "address")
        assert tag == "addr"
        receiver = CTX.Process(target=shm_testkit.receiver_main, args=(q, addr, connections), daemon=True)
        receiver.start()
        got = {}
        for _ in range(2):
            msg = _get(q, "completion")
            got[msg[0]] = msg[1:]
        digest, nbytes, nseg = got["receiver"]
        _, _, lengths = shm_testkit.mp_plan(seed)
        assert nseg == shm_testkit.N_BLOCKS
        assert nbytes == int(lengths.sum())
        assert digest == shm_testkit.mp_expected_digest(seed), "receiver memory differs from the pattern"
        acked, errors = got["sender"]
        assert acked
        assert errors == []
    finally:
        _reap(sender, *([receiver] if receiver else []))
    assert sender.exitcode == 0
    assert receiver.exitcode == 0
    assert ring_files(sender_pid) == []


def test_sender_killed_mid_frame(make_transport):
    """The receiver reports the cut frame through on_closed (no hang, no on_data) and keeps listening."""
    nbytes = 64 << 20  # 64 chunks through a 3-slot ring
    memory = MemoryRegistry()
    buf = registered(memory, 1, nbytes)
    q = CTX.Queue()
    gate = threading.Event()

    def accept(_tid: bytes, _layer: int) -> bool:
        q.put("accepting")
        gate.wait(WAIT_S)  # hold the payload back until the sender is dead
        return True

    handler = Recorder(accept_cb=accept)
    srv = make_transport(io_timeout_s=30.0)
    addr = srv.listen("127.0.0.1", 0, handler, memory)
    p = CTX.Process(target=shm_testkit.stalled_sender_main, args=(q, addr, nbytes), daemon=True)
    p.start()
    try:
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
    assert "middle of a frame" in str(err)
    assert not handler.data
    assert buf[-1] == 0
    assert ring_files(p.pid) == []

    cli = make_transport(connections_per_peer=1)
    peer = cli.connect(addr, Recorder(), MemoryRegistry())
    src = np.full(16, 9, np.uint8)
    one = np.ones(1, np.uint64)
    peer.channels[0].send_data(b"\x05" * 16, 0, np.array([src.ctypes.data], np.uint64), one,
                               np.zeros(1, np.uint64), np.array([16], np.uint64))
    handler.wait(lambda r: len(r.data) == 1)
    assert (buf[:16] == 9).all()
