"""Listener and peer in one process, over real sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from tcp_testkit import Recorder
from tcp_testkit import expected_copy
from tcp_testkit import registered
from tcp_testkit import scatter_plan

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind


@pytest.fixture
def pair(make_transport):
    """(server transport, server handler, server memory, client peer, client handler, client memory)."""
    srv, cli = make_transport(), make_transport(connections_per_peer=3)
    smem, cmem = MemoryRegistry(), MemoryRegistry()
    shand, chand = Recorder(), Recorder()
    addr = srv.listen("127.0.0.1", 0, shand, smem)
    peer = cli.connect(addr, chand, cmem)
    return srv, shand, smem, peer, chand, cmem


def _server_channel(shand: Recorder, peer, key: int = 0):
    """The accepted channel the peer's channel ``key`` talks to (found by a HELLO)."""
    tid = wire.new_transfer_id()
    peer.channel_for(key).send_control(Kind.HELLO, tid, {"key": key})
    shand.wait(lambda r: any(t == bytes.fromhex(tid) for _, _, t, _ in r.controls))
    return next(c for c, _, t, _ in shand.controls if t == bytes.fromhex(tid))


def test_listen_returns_bound_address(make_transport):
    t = make_transport()
    addr = t.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert t.addresses == [addr]


def test_connect_opens_connections_per_peer(pair):
    _, shand, _, peer, _, _ = pair
    assert len(peer.channels) == 3
    assert all(c.peer_name == peer.address for c in peer.channels)
    accepted = {_server_channel(shand, peer, k) for k in range(3)}
    assert len(accepted) == 3  # one accepted channel (and receive thread) per connection


def test_control_round_trip(pair):
    _, shand, _, peer, chand, _ = pair
    tid = wire.new_transfer_id()
    body = {"model": "m", "layers": list(range(5)), "nested": {"a": 1.5, "b": None}}
    peer.channels[1].send_control(Kind.HELLO, tid, body)
    shand.wait(lambda r: len(r.controls) == 1)
    ch, kind, t, got = shand.controls[0]
    assert (kind, t, got) == (Kind.HELLO, bytes.fromhex(tid), body)
    ch.send_control(Kind.HELLO_OK, bytes.fromhex(tid))  # reply on the accepted channel
    chand.wait(lambda r: len(r.controls) == 1)
    rch, kind, t, got = chand.controls[0]
    assert (rch, kind, t, got) == (peer.channels[1], Kind.HELLO_OK, bytes.fromhex(tid), {})


@pytest.mark.parametrize("n", [1, 4096])
def test_data_scattered_both_directions(pair, n):
    _, shand, smem, peer, chand, cmem = pair
    rng = np.random.default_rng(n)
    block = 1024
    size = n * block
    # client -> server: region 5 of the server
    src_c = rng.integers(0, 256, size, dtype=np.uint8)
    dst_s = registered(smem, 5, size)
    s_off, d_off, lengths = scatter_plan(rng, n, block)
    tid = wire.new_transfer_id()
    sent = peer.channels[0].send_data(tid, 9, np.uint64(src_c.ctypes.data) + s_off,
                                      np.full(n, 5, np.uint64), d_off, lengths)
    assert sent == int(lengths.sum())
    shand.wait(lambda r: len(r.data) == 1)
    ch, t, layer, nbytes, nseg = shand.data[0]
    assert (t, layer, nbytes, nseg) == (bytes.fromhex(tid), 9, sent, n)
    np.testing.assert_array_equal(dst_s, expected_copy(src_c, size, s_off, d_off, lengths))

    # server -> client on the accepted channel: region 2 of the client
    src_s = rng.integers(0, 256, size, dtype=np.uint8)
    dst_c = registered(cmem, 2, size)
    s_off, d_off, lengths = scatter_plan(rng, n, block)
    ch.send_data(bytes.fromhex(tid), 10, np.uint64(src_s.ctypes.data) + s_off,
                 np.full(n, 2, np.uint64), d_off, lengths)
    chand.wait(lambda r: len(r.data) == 1)
    assert chand.data[0][0] is peer.channels[0]
    assert chand.data[0][2:] == (10, int(lengths.sum()), n)
    np.testing.assert_array_equal(dst_c, expected_copy(src_s, size, s_off, d_off, lengths))


def test_data_many_regions_in_one_frame(pair):
    _, shand, smem, peer, _, _ = pair
    bufs = [registered(smem, rid, 64 << 10) for rid in (1, 4, 7)]
    src = np.arange(3 * 1000, dtype=np.uint8)
    regions = np.array([1, 4, 7] * 1000, dtype=np.uint64)
    offsets = np.repeat(np.arange(1000, dtype=np.uint64) * 64, 3)
    lengths = np.ones(3000, np.uint64)
    addrs = np.uint64(src.ctypes.data) + np.arange(3000, dtype=np.uint64)
    peer.channels[0].send_data(wire.new_transfer_id(), 0, addrs, regions, offsets, lengths)
    shand.wait(lambda r: len(r.data) == 1)
    for k, buf in enumerate(bufs):
        np.testing.assert_array_equal(buf[::64][:1000], src[k::3])


def test_empty_data_frame(pair):
    _, shand, _, peer, _, _ = pair
    e = np.zeros(0, np.uint64)
    assert peer.channels[0].send_data(wire.new_transfer_id(), 3, e, e, e, e) == 0
    shand.wait(lambda r: len(r.data) == 1)
    assert shand.data[0][2:] == (3, 0, 0)


def test_concurrent_senders(pair):
    """Eight threads share three channels; each writes its own region; frames never interleave."""
    _, shand, smem, peer, _, _ = pair
    n_threads, frames, n, block = 8, 6, 512, 256
    dsts = [registered(smem, 10 + i, frames * n * block) for i in range(n_threads)]
    srcs = [np.random.default_rng(i).integers(0, 256, frames * n * block, dtype=np.uint8)
            for i in range(n_threads)]
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
        want = srcs[i].reshape(frames, n, block)[:, ::-1, :].reshape(-1)
        np.testing.assert_array_equal(dsts[i], want)
    assert not shand.closed


def test_refused_data_is_dropped_and_stream_stays_in_sync(make_transport):
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
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
    ch.send_data(refused, 1, np.uint64(src.ctypes.data) + s_off, regions, d_off, lengths)  # > scratch size
    ch.send_control(Kind.DONE, refused, {"n": 1})
    ok = wire.new_transfer_id()
    ch.send_data(ok, 2, np.uint64(src.ctypes.data) + s_off[:10], regions[:10], d_off[:10], lengths[:10])
    shand.wait(lambda r: len(r.data) == 1)
    assert [a for a in shand.asked] == [(bytes.fromhex(refused), 1), (bytes.fromhex(ok), 2)]
    assert shand.data[0][1] == bytes.fromhex(ok)  # on_data only for the accepted frame
    assert [(k, b) for _, k, _, b in shand.controls] == [(Kind.DONE, {"n": 1})]
    base = np.full(8 << 20, 0xAB, np.uint8)
    want = expected_copy(src, 8 << 20, s_off[:10], d_off[:10], lengths[:10], base=base)
    np.testing.assert_array_equal(dst, want)
    assert not shand.closed


def test_send_on_closed_channel_raises(pair):
    _, shand, _, peer, chand, _ = pair
    ch = peer.channels[0]
    ch.close()
    assert ch.closed
    with pytest.raises(TransferError, match="closed"):
        ch.send_control(Kind.HELLO, wire.new_transfer_id())
    e = np.zeros(0, np.uint64)
    with pytest.raises(TransferError, match="closed"):
        ch.send_data(wire.new_transfer_id(), 0, e, e, e, e)
    chand.wait(lambda r: len(r.closed) == 1)
    assert chand.closed[0] == (ch, None)  # a local close is clean
    shand.wait(lambda r: len(r.closed) == 1)  # the other side sees the peer go
    assert isinstance(shand.closed[0][1], TransferError)
    peer.channels[1].send_control(Kind.HELLO, wire.new_transfer_id())  # the others still work
    shand.wait(lambda r: len(r.controls) == 1)


def test_peer_close_reaches_both_sides(pair):
    _, shand, _, peer, chand, _ = pair
    peer.close()
    peer.close()
    chand.wait(lambda r: len(r.closed) == 3)
    assert all(e is None for _, e in chand.closed)
    shand.wait(lambda r: len(r.closed) == 3)
    assert all("closed the connection" in str(e) for _, e in shand.closed)


def test_transport_close_is_idempotent_and_stops_everything(make_transport):
    srv, cli = make_transport(), make_transport()
    shand, chand = Recorder(), Recorder()
    addr = srv.listen("127.0.0.1", 0, shand, MemoryRegistry())
    peer = cli.connect(addr, chand, MemoryRegistry())
    for ch in peer.channels:  # both connections accepted before closing
        ch.send_control(Kind.HELLO, wire.new_transfer_id())
    shand.wait(lambda r: len(r.controls) == 2)
    srv.close()
    srv.close()
    shand.wait(lambda r: len(r.closed) == 2)
    assert all(e is None for _, e in shand.closed)
    chand.wait(lambda r: len(r.closed) == 2)  # the peer's receive threads see EOF
    assert all(isinstance(e, TransferError) for _, e in chand.closed)
    with pytest.raises(TransferError):
        cli.connect(addr, chand, MemoryRegistry())  # nobody listens any more
    with pytest.raises(TransferError, match="closed"):
        srv.listen("127.0.0.1", 0, shand, MemoryRegistry())
    cli.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lkv-tcp")]


def test_handler_exception_does_not_kill_the_channel(make_transport):
    srv, cli = make_transport(), make_transport(connections_per_peer=1)

    def boom(*_):
        raise RuntimeError("handler bug")

    shand = Recorder(on_control_cb=boom)
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, MemoryRegistry()), Recorder(), MemoryRegistry())
    for _ in range(3):
        peer.channels[0].send_control(Kind.PULL, wire.new_transfer_id(), {})
    shand.wait(lambda r: len(r.controls) == 3)
    assert not shand.closed


def test_handler_accept_exception_drops_the_payload(make_transport):
    bad = b"\x0b" * 16

    def accept(tid: bytes, _layer: int) -> bool:
        if tid == bad:
            raise RuntimeError("handler bug")
        return True

    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    smem = MemoryRegistry()
    dst = registered(smem, 1, 4096)
    shand = Recorder(accept_cb=accept)
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
    src = np.full(4096, 3, np.uint8)
    args = (np.array([src.ctypes.data], np.uint64), np.ones(1, np.uint64), np.zeros(1, np.uint64),
            np.array([4096], np.uint64))
    peer.channels[0].send_data(bad, 0, *args)
    assert not dst.any()
    peer.channels[0].send_data(b"\x0c" * 16, 0, *args)
    shand.wait(lambda r: len(r.data) == 1)
    assert shand.data[0][1] == b"\x0c" * 16
    assert (dst == 3).all()
    assert not shand.closed


def test_bad_send_arguments_leave_the_channel_usable(pair):
    _, shand, _, peer, _, _ = pair
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
