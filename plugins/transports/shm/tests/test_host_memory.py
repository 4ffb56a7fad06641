"""shm specifics with host memory, listener and peer in one process: the ring, the CMA path, which peers
are refused, options.

What every transport must do is in the conformance suite (test_conformance.py), run there on
both host paths.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from shm_testkit import PATHS
from shm_testkit import SMALL_RING
from shm_testkit import needs_cma
from shm_testkit import ring_files

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import expected_copy
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.frames import scatter_plan
from llumnix_kv_core.wire import Kind

EXTRA = dict(SMALL_RING)


@pytest.fixture(params=PATHS)
def pair(make_transport, request):
    """(server handler, server memory, client peer, client handler, client memory); both host paths."""
    extra = {**EXTRA, "host_path": request.param}
    srv, cli = make_transport(extra=extra), make_transport(connections_per_peer=3, extra=extra)
    smem, cmem = MemoryRegistry(), MemoryRegistry()
    shand, chand = Recorder(), Recorder()
    # Announced at handshake, so registered before connecting; the buffers live as long as the test.
    smem.keep = registered(smem, 5, 8 << 20)
    cmem.keep = registered(cmem, 2, 8 << 20)
    addr = srv.listen("127.0.0.1", 0, shand, smem)
    peer = cli.connect(addr, chand, cmem)
    return shand, smem, peer, chand, cmem


def _region(memory: MemoryRegistry, rid: int) -> np.ndarray:
    r = memory.get(rid)
    return np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * r.nbytes).from_address(r.addr))


def test_empty_frame_needs_no_ring_nor_copy(pair):
    shand, _, peer, _, _ = pair
    e = np.zeros(0, np.uint64)
    assert peer.channels[0].send_data(wire.new_transfer_id(), 3, e, e, e, e) == 0
    shand.wait(lambda r: len(r.data) == 1)
    assert shand.data[0][2:] == (3, 0, 0)
    assert peer.channels[0]._out_ring is None


def test_ring_is_mapped_once_and_its_file_unlinked(make_transport):
    srv, cli = make_transport(extra=EXTRA), make_transport(connections_per_peer=1, extra=EXTRA)
    smem = MemoryRegistry()
    smem.keep = registered(smem, 5, 8 << 20)
    shand = Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    src = np.full(3 << 20, 7, np.uint8)
    one = np.ones(1, np.uint64)
    ch = peer.channels[0]
    for i in range(3):
        ch.send_data(wire.new_transfer_id(), i, np.array([src.ctypes.data], np.uint64), one * 5,
                     np.zeros(1, np.uint64), np.array([src.nbytes], np.uint64))
    shand.wait(lambda r: len(r.data) == 3)
    ring = ch._out_ring
    assert ring is not None
    assert ring.addr
    assert ch._out_ring is ring  # kept mapped, not one mapping per transfer
    assert ring_files() == []  # both sides mapped it: nothing left in /dev/shm
    assert (_region(smem, 5)[: src.nbytes] == 7).all()


def test_unusable_ring_dir_is_reported_on_send(make_transport, tmp_path):
    srv = make_transport()
    cli = make_transport(connections_per_peer=1, extra={"ring_dir": str(tmp_path / "missing"), "host_path": "ring"})
    smem = MemoryRegistry()
    smem.keep = registered(smem, 1, 4096)
    peer = cli.connect(srv.listen("127.0.0.1", 0, Recorder(), smem), Recorder(), MemoryRegistry())
    src = np.zeros(16, np.uint8)
    one = np.ones(1, np.uint64)
    with pytest.raises(TransferError, match=r"cannot create the shared-memory ring.*ring_dir"):
        peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64), one,
                                   np.zeros(1, np.uint64), np.array([16], np.uint64))


@pytest.mark.parametrize("bad", [{"slot_bytes": 1000}, {"slots": 1}, {"copy_threads": -1}, {"ring": 3},
                                 {"host_path": "dma"}])
def test_bad_options_are_refused_with_the_fix(make_transport, bad):
    with pytest.raises(ValueError, match=r"slot_bytes|slots|copy_threads|understands|host_path"):
        make_transport(extra=bad)


@needs_cma
def test_cma_writes_straight_into_the_peer_and_sends_no_payload_through_a_ring(make_transport):
    srv = make_transport(extra={"host_path": "cma"})
    cli = make_transport(connections_per_peer=1, extra={"host_path": "cma"})
    smem = MemoryRegistry()
    dst = registered(smem, 1, 64 << 20)
    shand = Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    rng = np.random.default_rng(9)
    src = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
    s_off, d_off, lengths = scatter_plan(rng, 4096, 16 << 10)
    peer.channels[0].send_data(wire.new_transfer_id(), 0, np.uint64(src.ctypes.data) + s_off,
                               np.ones(4096, np.uint64), d_off, lengths)
    shand.wait(lambda r: len(r.data) == 1)
    np.testing.assert_array_equal(dst, expected_copy(src, 64 << 20, s_off, d_off, lengths))
    assert peer.channels[0]._out_ring is None


def test_without_cross_memory_copies_auto_uses_the_ring_and_cma_says_why(make_transport, monkeypatch):
    real_has = native.has
    monkeypatch.setattr(native, "has", lambda feature: False if feature == "cma" else real_has(feature))
    for path in ("auto", "cma"):
        srv, cli = make_transport(extra={"host_path": path}), make_transport(extra={"host_path": path})
        smem = MemoryRegistry()
        dst = registered(smem, 1, 4096)
        shand = Recorder()
        peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
        src = np.full(4096, 5, np.uint8)
        args = (wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64), np.ones(1, np.uint64),
                np.zeros(1, np.uint64), np.array([4096], np.uint64))
        if path == "cma":
            with pytest.raises(TransferError, match=r"host_path 'cma' cannot reach.*lacks cross-memory copies"):
                peer.channels[0].send_data(*args)
        else:
            peer.channels[0].send_data(*args)
            shand.wait(lambda r: len(r.data) == 1)
            assert (dst == 5).all()
            assert peer.channels[0]._out_ring is not None


def test_unannounced_region_is_refused_by_the_sender(pair):
    _, _, peer, _, _ = pair
    one = np.ones(1, np.uint64)
    with pytest.raises(ValueError, match="region 9 of the peer, which it did not announce"):
        peer.channels[0].send_data(wire.new_transfer_id(), 0, one, one * 9, one, one)
    assert not peer.channels[0].closed


def test_peer_on_another_host_is_refused_before_connecting(make_transport):
    t = make_transport()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match=r"not on this host.*use the tcp transport"):
        t.connect("192.0.2.1:5555", Recorder(), MemoryRegistry())  # TEST-NET-1: never a local address
    assert time.monotonic() - t0 < 2


def test_handshake_from_another_host_identity_is_refused(make_transport):
    srv = make_transport()
    shand = Recorder()
    host, port = srv.listen("127.0.0.1", 0, shand, MemoryRegistry()).rsplit(":", 1)
    body = json.dumps({"op": "hello", "host": "elsewhere/0000", "pid": 1, "regions": []}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(wire.pack_header(Kind.TRANSPORT, bytes(16), body_len=len(body)) + body)
        _h, got = read_frame(s)
        assert got["op"] == "refuse"
        assert "not this host" in got["error"]
        assert "use the tcp transport" in got["error"]
        assert read_frame(s) is None  # then the listener closes
    shand.wait(lambda r: len(r.closed) == 1)
    assert "refused" in str(shand.closed[0][1])


def test_frames_before_the_handshake_are_refused(make_transport):
    srv = make_transport()
    shand = Recorder()
    host, port = srv.listen("127.0.0.1", 0, shand, MemoryRegistry()).rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(wire.pack_header(Kind.PULL, bytes(16)))
        h, got = read_frame(s)
        assert h.kind == Kind.ERROR
        assert "before the shm handshake" in got["error"]
    shand.wait(lambda r: len(r.closed) == 1)
    assert not shand.controls


def test_tcp_peer_connecting_to_shm_listener_gets_a_clear_error(make_transport):
    from llumnix_kv_transport_tcp.transport import TcpTransport

    srv = make_transport()
    addr = srv.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
    shm_cli = make_transport(connect_timeout_s=1.0)
    tcp = TcpTransport(TransportConfig(connect_timeout_s=2.0, io_timeout_s=2.0, connections_per_peer=1))
    try:
        tcp_srv_addr = tcp.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
        with pytest.raises(TransferError, match="handshake"):
            shm_cli.connect(tcp_srv_addr, Recorder(), MemoryRegistry())  # a tcp listener never answers it
    finally:
        tcp.close()
    assert addr


def test_gpu_region_without_cuda_fails_at_connect_naming_the_cause(make_transport):
    if native.has("cuda"):
        pytest.skip("a GPU is usable here; this checks the error without one")
    srv, cli = make_transport(), make_transport()
    addr = srv.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
    mem = MemoryRegistry()
    buf = np.zeros(4096, np.uint8)
    mem.register(MemoryRegion(0, buf.ctypes.data, buf.nbytes, "cuda:0"))
    with pytest.raises(TransferError, match="GPU memory is registered but the CUDA core is unusable"):
        cli.connect(addr, Recorder(), mem)
