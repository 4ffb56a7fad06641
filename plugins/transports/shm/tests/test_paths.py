"""The seams of an shm channel: TRANSPORT frames, the handshake over them, the data paths' messages.

Raw sockets speak the shm protocol by hand against a real listener, so each message is checked
on the wire: the handshake and the paths' messages are TRANSPORT frames, they never reach the
frame handler, and one out of place closes the channel with an ERROR frame naming it.
"""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import pytest
from llumnix_kv_transport_shm.local import host_identity
from shm_testkit import PATHS
from shm_testkit import SMALL_RING

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.wire import Kind


def transport_frame(op: str, **fields) -> bytes:
    body = wire.encode_body({"op": op, **fields})
    return wire.pack_header(Kind.TRANSPORT, bytes(16), body_len=len(body)) + body


def raw_connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)))


@pytest.fixture
def listener(make_transport):
    """(address, handler, its buffer) of an shm listener with host region 5 registered."""
    srv = make_transport(extra=dict(SMALL_RING))
    mem = MemoryRegistry()
    mem.keep = registered(mem, 5, 1 << 20)
    handler = Recorder()
    return srv.listen("127.0.0.1", 0, handler, mem), handler, mem.keep


def test_the_handshake_is_a_transport_exchange(listener):
    address, handler, buf = listener
    with raw_connect(address) as s:
        s.sendall(transport_frame("hello", host=host_identity(), pid=os.getpid(), regions=[]))
        h, body = read_frame(s)
        assert h.kind == Kind.TRANSPORT
        assert body["op"] == "hello_ok"
        assert body["pid"] == os.getpid()
        assert [(r["region"], r["nbytes"], r["addr"]) for r in body["regions"]] == [(5, buf.nbytes, buf.ctypes.data)]
    handler.wait(lambda r: len(r.closed) == 1)
    assert not handler.controls


def test_handshake_from_another_host_is_refused(listener):
    address, handler, _ = listener
    with raw_connect(address) as s:
        s.sendall(transport_frame("hello", host="elsewhere/0000", pid=1, regions=[]))
        h, body = read_frame(s)
        assert (h.kind, body["op"]) == (Kind.TRANSPORT, "refuse")
        assert "not this host" in body["error"]
        assert "use the tcp transport" in body["error"]
        assert read_frame(s) is None  # then the listener closes
    handler.wait(lambda r: len(r.closed) == 1)
    assert "refused" in str(handler.closed[0][1])


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "chunk", "slot": 0, "n": 1}, "ring chunk without a host-memory frame in progress"),
        ({"op": "end"}, "'end' without a directly written frame in progress"),
        ({"op": "hello", "host": "x"}, "second shm handshake on one channel"),
        ({"op": "hello_ok"}, "unknown shm transport message 'hello_ok'"),
        ({"op": "bogus"}, "unknown shm transport message 'bogus'"),
    ],
    ids=["chunk", "end", "second-hello", "late-hello-ok", "unknown"],
)
def test_a_transport_message_out_of_place_closes_the_channel(listener, message, error):
    address, handler, _ = listener
    with raw_connect(address) as s:
        s.sendall(transport_frame("hello", host=host_identity(), pid=os.getpid(), regions=[]))
        assert read_frame(s)[1]["op"] == "hello_ok"
        s.sendall(transport_frame(**message))
        h, body = read_frame(s)
        assert h.kind == Kind.ERROR
        assert error in body["error"]
        assert read_frame(s) is None
    handler.wait(lambda r: len(r.closed) == 1)
    assert isinstance(handler.closed[0][1], FrameError)
    assert not handler.controls


@pytest.mark.parametrize("path", PATHS)
def test_path_messages_never_reach_the_handler(make_transport, path):
    """A multi-chunk ring frame (ring, chunk, credit) or a fenced one (go, end), both ways."""
    extra = {**dict(SMALL_RING), "host_path": path}
    srv, cli = make_transport(extra=extra), make_transport(connections_per_peer=1, extra=extra)
    smem, cmem = MemoryRegistry(), MemoryRegistry()
    sbuf, cbuf = registered(smem, 1, 4 << 20), registered(cmem, 2, 4 << 20)
    smem.keep, cmem.keep = sbuf, cbuf
    shand, chand = Recorder(), Recorder()
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), chand, cmem)
    src = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8)
    one = np.ones(1, np.uint64)
    args = (np.array([src.ctypes.data], np.uint64), np.zeros(1, np.uint64), np.array([src.nbytes], np.uint64))
    peer.channels[0].send_data(wire.new_transfer_id(), 0, args[0], one, *args[1:])
    shand.wait(lambda r: len(r.data) == 1)
    shand.data[0][0].send_data(wire.new_transfer_id(), 1, args[0], one * 2, *args[1:])
    chand.wait(lambda r: len(r.data) == 1)
    assert (sbuf[: src.nbytes] == src).all()
    assert (cbuf[: src.nbytes] == src).all()
    assert shand.controls == []
    assert chand.controls == []
    assert (peer.channels[0]._out_ring is None) == (path == "cma")


def test_send_control_refuses_transport_frames(listener, make_transport):
    address, handler, _ = listener
    peer = make_transport(connections_per_peer=1).connect(address, Recorder(), MemoryRegistry())
    ch = peer.channels[0]
    with pytest.raises(ValueError, match="transport's own messages"):
        ch.send_control(Kind.TRANSPORT, bytes(16), {"op": "chunk", "slot": 0, "n": 1})
    ch.send_control(Kind.CANCEL, wire.new_transfer_id())
    handler.wait(lambda r: len(r.controls) == 1)
    assert not ch.closed


def test_a_tcp_channel_refuses_transport_frames():
    from llumnix_kv_transport_tcp.transport import TcpTransport

    handler = Recorder()
    tcp = TcpTransport(TransportConfig(connect_timeout_s=2.0, io_timeout_s=2.0))
    try:
        with raw_connect(tcp.listen("127.0.0.1", 0, handler, MemoryRegistry())) as s:
            s.sendall(transport_frame("hello"))
            h, body = read_frame(s)
            assert h.kind == Kind.ERROR
            assert "the tcp transport has no messages of its own" in body["error"]
        handler.wait(lambda r: len(r.closed) == 1)
        assert not handler.controls
    finally:
        tcp.close()


def test_the_host_path_is_chosen_at_handshake(make_transport, monkeypatch, caplog):
    """Without cross-memory copies: ``auto`` says so at connect; ``cma`` refuses only frames with a payload."""
    real_has = native.has
    monkeypatch.setattr(native, "has", lambda feature: False if feature == "cma" else real_has(feature))
    smem = MemoryRegistry()
    smem.keep = registered(smem, 1, 4096)
    for path in ("auto", "cma"):
        srv = make_transport(extra={"host_path": path})
        cli = make_transport(connections_per_peer=2, extra={"host_path": path})
        shand = Recorder()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llumnix_kv_transport_shm.channel"):
            peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), Recorder(), MemoryRegistry())
        said = [r.getMessage() for r in caplog.records if "host memory moves through the ring" in r.getMessage()]
        # Once per channel, on the connecting side only: the listener's peer registered no host memory.
        assert len(said) == (2 if path == "auto" else 0), said
        e = np.zeros(0, np.uint64)
        assert peer.channels[0].send_data(wire.new_transfer_id(), 0, e, e, e, e) == 0
        shand.wait(lambda r: len(r.data) == 1)
        if path == "cma":
            src = np.zeros(8, np.uint8)
            with pytest.raises(TransferError, match=r"host_path 'cma' cannot reach"):
                peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                                           np.ones(1, np.uint64), np.zeros(1, np.uint64), np.ones(1, np.uint64) * 8)
            assert not peer.channels[0].closed
