"""TCP specifics in one process: raw sockets that never read or stall, late registration, loopback throughput.

What every transport must do is in the conformance suite (test_conformance.py).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import expected_copy
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.frames import scatter_plan
from llumnix_kv_core.wire import Kind


def test_memory_registered_after_connecting_is_written(make_transport):
    """tcp announces nothing at connect: a region registered later is reachable, on either side."""
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    smem, cmem = MemoryRegistry(), MemoryRegistry()
    shand, chand = Recorder(), Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), chand, cmem)
    dst_s, dst_c = registered(smem, 5, 1 << 20), registered(cmem, 2, 1 << 20)
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    s_off, d_off, lengths = scatter_plan(rng, 1024, 1024)
    tid = wire.new_transfer_id()
    peer.channels[0].send_data(tid, 0, np.uint64(src.ctypes.data) + s_off, np.full(1024, 5, np.uint64), d_off, lengths)
    shand.wait(lambda r: len(r.data) == 1)
    np.testing.assert_array_equal(dst_s, expected_copy(src, 1 << 20, s_off, d_off, lengths))
    shand.data[0][0].send_data(tid, 1, np.uint64(src.ctypes.data) + s_off, np.full(1024, 2, np.uint64), d_off,
                               lengths)
    chand.wait(lambda r: len(r.data) == 1)
    np.testing.assert_array_equal(dst_c, dst_s)
    peer.channels[0].send_control(Kind.DONE, tid)
    shand.wait(lambda r: len(r.controls) == 1)
    assert not shand.closed


def test_close_unblocks_a_stuck_sender(make_transport):
    """A send blocked on a peer that does not read fails at once when the channel is closed."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        cli = make_transport(io_timeout_s=60.0, connections_per_peer=1)
        peer = cli.connect(f"127.0.0.1:{lsock.getsockname()[1]}", Recorder(), MemoryRegistry())
        conn, _ = lsock.accept()
        big = np.zeros(256 << 20, np.uint8)
        one = np.ones(1, np.uint64)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([big.ctypes.data], np.uint64),
                                           one, np.zeros(1, np.uint64), np.array([big.nbytes], np.uint64))
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=send)
        th.start()
        time.sleep(0.3)
        assert th.is_alive()
        t0 = time.monotonic()
        cli.close()
        th.join(10)
        assert not th.is_alive()
        assert time.monotonic() - t0 < 10
        assert len(errors) == 1
        assert isinstance(errors[0], TransferError)
        conn.close()
    finally:
        lsock.close()


def test_send_times_out_when_peer_does_not_read(make_transport):
    """A peer that accepts but never reads: the send fails after io_timeout_s, the channel closes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        cli = make_transport(io_timeout_s=0.5, connections_per_peer=1)
        chand = Recorder()
        peer = cli.connect(f"127.0.0.1:{lsock.getsockname()[1]}", chand, MemoryRegistry())
        conn, _ = lsock.accept()
        big = np.zeros(256 << 20, np.uint8)
        one = np.ones(1, np.uint64)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError, match="no progress"):
            peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([big.ctypes.data], np.uint64),
                                       one, np.zeros(1, np.uint64), np.array([big.nbytes], np.uint64))
        print(f"send timeout raised after {time.monotonic() - t0:.2f} s")
        assert peer.channels[0].closed
        chand.wait(lambda r: len(r.closed) == 1)
        assert isinstance(chand.closed[0][1], TransferTimeoutError)
        conn.close()
    finally:
        lsock.close()


def test_receive_times_out_on_a_stalled_frame(make_transport):
    srv = make_transport(io_timeout_s=0.5)
    smem = MemoryRegistry()
    dst = registered(smem, 1, 4096)
    shand = Recorder()
    host, port = srv.listen("127.0.0.1", 0, shand, smem).rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        table = wire.pack_table(np.ones(1, np.uint64), np.zeros(1, np.uint64), np.array([4096], np.uint64))
        head = wire.pack_header(Kind.DATA, b"\x02" * 16, layer=0, n_segments=1, payload_len=4096)
        s.sendall(head + table + b"\x07" * 100)  # then stall mid-payload
        shand.wait(lambda r: len(r.closed) == 1, timeout=10)
    err = shand.closed[0][1]
    assert isinstance(err, TransferTimeoutError)
    assert "no progress" in str(err)
    assert (dst[100:] == 0).all()


@pytest.mark.parametrize(("label", "n", "seg"), [("one 256 MiB frame", 1, 256 << 20),
                                                 ("8192 x 16 KiB segments", 8192, 16 << 10)])
def test_loopback_throughput(make_transport, label, n, seg):
    """Prints the loopback rate; timing is reported, never asserted."""
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    smem = MemoryRegistry()
    size = n * seg
    dst = registered(smem, 1, size)
    shand = Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    src = np.full(size, 0x5A, np.uint8)
    off = np.arange(n, dtype=np.uint64) * np.uint64(seg)
    addrs = np.uint64(src.ctypes.data) + off
    regions, lengths = np.ones(n, np.uint64), np.full(n, seg, np.uint64)
    ch = peer.channels[0]
    rounds = 4
    ch.send_data(wire.new_transfer_id(), 0, addrs, regions, off[::-1].copy(), lengths)  # warm-up
    shand.wait(lambda r: len(r.data) == 1)
    t0 = time.perf_counter()
    for i in range(rounds):
        ch.send_data(wire.new_transfer_id(), i, addrs, regions, off[::-1].copy(), lengths)
    shand.wait(lambda r: len(r.data) == rounds + 1)
    dt = time.perf_counter() - t0
    print(f"\ntcp loopback ({native.implementation} I/O), {label}: {rounds * size / dt / 1e9:.2f} GB/s")
    assert (dst == 0x5A).all()
