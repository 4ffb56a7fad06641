"""The shm transport between host memories: listener and peer in one process, over a real ring."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest
from shm_testkit import PATHS
from shm_testkit import SMALL_RING
from shm_testkit import Recorder
from shm_testkit import expected_copy
from shm_testkit import needs_cma
from shm_testkit import read_frame
from shm_testkit import registered
from shm_testkit import ring_files
from shm_testkit import scatter_plan

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
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


def test_listen_returns_a_loopback_address(make_transport):
    t = make_transport()
    addr = t.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert t.addresses == [addr]


def test_control_round_trip(pair):
    shand, _, peer, chand, _ = pair
    tid = wire.new_transfer_id()
    body = {"model": "m", "layers": list(range(5)), "nested": {"a": 1.5, "b": None}}
    peer.channels[1].send_control(Kind.HELLO, tid, body)
    shand.wait(lambda r: len(r.controls) == 1)
    ch, kind, t, got = shand.controls[0]
    assert (kind, t, got) == (Kind.HELLO, bytes.fromhex(tid), body)
    ch.send_control(Kind.HELLO_OK, bytes.fromhex(tid))
    chand.wait(lambda r: len(r.controls) == 1)
    assert chand.controls[0][:3] == (peer.channels[1], Kind.HELLO_OK, bytes.fromhex(tid))


@pytest.mark.parametrize(("n", "block"), [(1, 1024), (4096, 1024), (100, 70_000)])
def test_scattered_data_both_directions(pair, n, block):
    """Many ring chunks (1 MiB slots, 3 of them: the ring wraps), unaligned lengths, both directions."""
    shand, smem, peer, chand, cmem = pair
    rng = np.random.default_rng(n)
    size = n * block
    dst_s = _region(smem, 5)[:size]
    src_c = rng.integers(0, 256, size, dtype=np.uint8)
    s_off, d_off, lengths = scatter_plan(rng, n, block)
    before = dst_s.copy()
    tid = wire.new_transfer_id()
    sent = peer.channels[0].send_data(tid, 9, np.uint64(src_c.ctypes.data) + s_off, np.full(n, 5, np.uint64),
                                      d_off, lengths)
    assert sent == int(lengths.sum())
    shand.wait(lambda r: len(r.data) == 1)
    ch, t, layer, nbytes, nseg = shand.data[0]
    assert (t, layer, nbytes, nseg) == (bytes.fromhex(tid), 9, sent, n)
    np.testing.assert_array_equal(dst_s, expected_copy(src_c, size, s_off, d_off, lengths, base=before))

    dst_c = _region(cmem, 2)[:size]
    before = dst_c.copy()
    src_s = rng.integers(0, 256, size, dtype=np.uint8)
    s_off, d_off, lengths = scatter_plan(rng, n, block)
    ch.send_data(bytes.fromhex(tid), 10, np.uint64(src_s.ctypes.data) + s_off, np.full(n, 2, np.uint64),
                 d_off, lengths)
    chand.wait(lambda r: len(r.data) == 1)
    assert chand.data[0][0] is peer.channels[0]
    assert chand.data[0][2:] == (10, int(lengths.sum()), n)
    np.testing.assert_array_equal(dst_c, expected_copy(src_s, size, s_off, d_off, lengths, base=before))


def test_many_regions_in_one_frame(make_transport):
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    smem = MemoryRegistry()
    bufs = [registered(smem, rid, 64 << 10) for rid in (1, 4, 7)]
    shand = Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    src = np.arange(3 * 1000, dtype=np.uint8)
    regions = np.array([1, 4, 7] * 1000, dtype=np.uint64)
    offsets = np.repeat(np.arange(1000, dtype=np.uint64) * 64, 3)
    addrs = np.uint64(src.ctypes.data) + np.arange(3000, dtype=np.uint64)
    peer.channels[0].send_data(wire.new_transfer_id(), 0, addrs, regions, offsets, np.ones(3000, np.uint64))
    shand.wait(lambda r: len(r.data) == 1)
    for k, buf in enumerate(bufs):
        np.testing.assert_array_equal(buf[::64][:1000], src[k::3])


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


def test_concurrent_senders(make_transport):
    """Eight threads share three channels; each writes its own region; frames never interleave."""
    srv, cli = make_transport(extra=EXTRA), make_transport(connections_per_peer=3, extra=EXTRA)
    smem = MemoryRegistry()
    n_threads, frames, n, block = 8, 6, 512, 256
    dsts = [registered(smem, 10 + i, frames * n * block) for i in range(n_threads)]
    shand = Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    srcs = [np.random.default_rng(i).integers(0, 256, frames * n * block, dtype=np.uint8) for i in range(n_threads)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for f in range(frames):
                off = np.arange(n, dtype=np.uint64) * np.uint64(block) + np.uint64(f * n * block)
                peer.channel_for(i + f).send_data(
                    wire.new_transfer_id(), f, np.uint64(srcs[i].ctypes.data) + off[::-1].copy(),
                    np.full(n, 10 + i, np.uint64), off, np.full(n, block, np.uint64))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    shand.wait(lambda r: len(r.data) == n_threads * frames)
    for i in range(n_threads):
        np.testing.assert_array_equal(dsts[i], srcs[i].reshape(frames, n, block)[:, ::-1, :].reshape(-1))
    assert not shand.closed


def test_refused_frame_is_drained_unwritten_and_the_channel_stays_in_sync(make_transport):
    srv, cli = make_transport(extra=EXTRA), make_transport(connections_per_peer=1, extra=EXTRA)
    smem = MemoryRegistry()
    dst = registered(smem, 1, 8 << 20, fill=0xAB)
    refused = wire.new_transfer_id()
    shand = Recorder(refuse={bytes.fromhex(refused)})
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    s_off, d_off, lengths = scatter_plan(rng, 2048, 4096)
    ch = peer.channels[0]
    regions = np.ones(2048, np.uint64)
    ch.send_data(refused, 1, np.uint64(src.ctypes.data) + s_off, regions, d_off, lengths)  # > the ring
    ch.send_control(Kind.DONE, refused, {"n": 1})
    ok = wire.new_transfer_id()
    ch.send_data(ok, 2, np.uint64(src.ctypes.data) + s_off[:10], regions[:10], d_off[:10], lengths[:10])
    shand.wait(lambda r: len(r.data) == 1)
    assert shand.asked == [(bytes.fromhex(refused), 1), (bytes.fromhex(ok), 2)]
    assert shand.data[0][1] == bytes.fromhex(ok)
    assert [(k, b) for _, k, _, b in shand.controls] == [(Kind.DONE, {"n": 1})]
    base = np.full(8 << 20, 0xAB, np.uint8)
    np.testing.assert_array_equal(dst, expected_copy(src, 8 << 20, s_off[:10], d_off[:10], lengths[:10], base=base))
    assert not shand.closed


def test_overrunning_frame_is_refused_and_nothing_is_written(make_transport):
    """The receiver checks every table against its own regions (the ring path, where it writes)."""
    srv, cli = make_transport(extra=EXTRA), make_transport(connections_per_peer=1, extra=EXTRA)
    smem = MemoryRegistry()
    dst = registered(smem, 1, 4096)
    shand, chand = Recorder(), Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), chand, MemoryRegistry())
    src = np.full(8192, 5, np.uint8)
    # The payload fits in the ring, so the send may return before the receiver has checked the table.
    with contextlib.suppress(TransferError):
        peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                                   np.ones(1, np.uint64), np.zeros(1, np.uint64), np.array([8192], np.uint64))
    chand.wait(lambda r: len(r.closed) == 1)
    chand.wait(lambda r: any(k == Kind.ERROR for _, k, _, _ in r.controls))
    err = next(b for _, k, _, b in chand.controls if k == Kind.ERROR)["error"]
    assert "overruns region 1" in err
    assert "Both sides must run" in err
    assert not dst.any()
    assert not shand.data


def test_unannounced_region_is_refused_by_the_sender(pair):
    _, _, peer, _, _ = pair
    one = np.ones(1, np.uint64)
    with pytest.raises(ValueError, match="region 9 of the peer, which it did not announce"):
        peer.channels[0].send_data(wire.new_transfer_id(), 0, one, one * 9, one, one)
    assert not peer.channels[0].closed


def test_bad_send_arguments_leave_the_channel_usable(pair):
    shand, _, peer, _, _ = pair
    ch = peer.channels[0]
    one = np.ones(1, np.uint64)
    with pytest.raises(ValueError, match="one length"):
        ch.send_data(wire.new_transfer_id(), 0, one, one, np.zeros(2, np.uint64), one)
    with pytest.raises(ValueError, match="integers"):
        ch.send_data(wire.new_transfer_id(), 0, one, one, np.zeros(1, np.float64), one)
    with pytest.raises(ValueError, match="layer"):
        ch.send_data(wire.new_transfer_id(), -1, one, one, one, one)
    with pytest.raises(ValueError, match="send_data"):
        ch.send_control(Kind.DATA, wire.new_transfer_id())
    ch.send_control(Kind.CANCEL, wire.new_transfer_id(), {"why": "test"})
    shand.wait(lambda r: len(r.controls) == 1)
    assert not ch.closed


def test_send_on_closed_channel_raises_and_close_reaches_both_sides(pair):
    shand, _, peer, chand, _ = pair
    ch = peer.channels[0]
    ch.close()
    with pytest.raises(TransferError, match="closed"):
        ch.send_control(Kind.HELLO, wire.new_transfer_id())
    chand.wait(lambda r: len(r.closed) == 1)
    assert chand.closed[0] == (ch, None)
    shand.wait(lambda r: len(r.closed) == 1)
    assert isinstance(shand.closed[0][1], TransferError)
    peer.channels[1].send_control(Kind.HELLO, wire.new_transfer_id())
    shand.wait(lambda r: len(r.controls) == 1)


def test_transport_close_is_idempotent_and_stops_everything(make_transport):
    srv, cli = make_transport(), make_transport()
    shand, chand = Recorder(), Recorder()
    addr = srv.listen("127.0.0.1", 0, shand, MemoryRegistry())
    cli.connect(addr, chand, MemoryRegistry())
    srv.close()
    srv.close()
    shand.wait(lambda r: len(r.closed) == 2)
    assert all(e is None for _, e in shand.closed)
    chand.wait(lambda r: len(r.closed) == 2)
    with pytest.raises(TransferError):
        cli.connect(addr, chand, MemoryRegistry())
    with pytest.raises(TransferError, match="closed"):
        srv.listen("127.0.0.1", 0, shand, MemoryRegistry())


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


@pytest.mark.parametrize("bad", [{"slot_bytes": 1000}, {"slots": 1}, {"copy_threads": -1}, {"ring": 3},
                                 {"host_path": "dma"}])
def test_bad_options_are_refused_with_the_fix(make_transport, bad):
    with pytest.raises(ValueError, match=r"slot_bytes|slots|copy_threads|understands|host_path"):
        make_transport(extra=bad)


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


@pytest.mark.parametrize("path", PATHS)
def test_refused_frame_is_not_written_on_either_path(make_transport, path):
    extra = {**EXTRA, "host_path": path}
    srv, cli = make_transport(extra=extra), make_transport(connections_per_peer=1, extra=extra)
    smem = MemoryRegistry()
    dst = registered(smem, 1, 1 << 20, fill=0xAB)
    fenced = wire.new_transfer_id()
    shand = Recorder(refuse={bytes.fromhex(fenced)})
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    src = np.full(1 << 20, 3, np.uint8)
    args = (np.array([src.ctypes.data], np.uint64), np.ones(1, np.uint64), np.zeros(1, np.uint64),
            np.array([1 << 20], np.uint64))
    peer.channels[0].send_data(fenced, 0, *args)
    ok = wire.new_transfer_id()
    peer.channels[0].send_data(ok, 1, *args[:3], np.array([4096], np.uint64))
    shand.wait(lambda r: len(r.data) == 1)
    assert shand.data[0][1] == bytes.fromhex(ok)
    assert (dst[:4096] == 3).all()
    assert (dst[4096:] == 0xAB).all(), "a fenced frame was written"


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


@needs_cma
def test_cma_overrun_is_refused_by_the_sender(make_transport):
    srv, cli = make_transport(extra={"host_path": "cma"}), make_transport(extra={"host_path": "cma"})
    smem = MemoryRegistry()
    smem.keep = registered(smem, 1, 4096)
    peer = cli.connect(srv.listen("127.0.0.1", 0, Recorder(), smem), Recorder(), MemoryRegistry())
    src = np.zeros(8192, np.uint8)
    with pytest.raises(ValueError, match="overruns region 1"):
        peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                                   np.ones(1, np.uint64), np.zeros(1, np.uint64), np.array([8192], np.uint64))
    assert not peer.channels[0].closed


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
