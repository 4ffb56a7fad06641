"""Garbage on the wire: the listener refuses the frame, leaves memory alone and keeps serving."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from tcp_testkit import Recorder
from tcp_testkit import raw_frame
from tcp_testkit import read_frame
from tcp_testkit import registered

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind

REGION_BYTES = 1 << 16


def _table(*segs: tuple[int, int, int]) -> bytes:
    a = np.array(segs, dtype=np.uint64).reshape(-1, 3)
    return wire.pack_table(a[:, 0], a[:, 1], a[:, 2])


def _data(table: bytes, n: int, payload_len: int) -> bytes:
    return raw_frame(Kind.DATA, table=table, n_segments=n, payload_len=payload_len) + b"\xee" * payload_len


CASES = {
    "garbage magic": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64, "bad frame magic"),
    "wrong version": (raw_frame(Kind.HELLO, version=wire.VERSION + 1), "frame version"),
    "unknown kind": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, 99, b"\0" * 16, 0, 0, 0, 0, 0),
                     "unknown frame kind"),
    "oversized body": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(Kind.HELLO), b"\0" * 16, 0, 0,
                                        wire.MAX_BODY + 1, 0, 0), "exceeds"),
    "body not json": (raw_frame(Kind.HELLO, body=b"{not json"), "not valid JSON"),
    "control with payload": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(Kind.PULL), b"\0" * 16,
                                              0, 1, 0, 0, 8), "only DATA frames"),
    "table does not match payload": (_data(_table((1, 0, 100)), 1, 99), "add up to"),
    "table overrun": (_data(_table((1, 0, 16), (1, REGION_BYTES - 10, 100)), 2, 116), "overruns region 1"),
    "offset wraps around": (_data(_table((1, 2**64 - 8, 16)), 1, 16), "overruns region 1"),
    "unregistered region": (_data(_table((1, 0, 16), (7, 0, 16)), 2, 32), "region 7"),
}


@pytest.fixture
def server(make_transport):
    srv = make_transport(io_timeout_s=5.0)
    memory = MemoryRegistry()
    buf = registered(memory, 1, REGION_BYTES)
    handler = Recorder()
    host, port = srv.listen("127.0.0.1", 0, handler, memory).rsplit(":", 1)
    return srv, (host, int(port)), handler, memory, buf


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_frame_is_refused(server, make_transport, case):
    _, addr, handler, _, buf = server
    payload, cause = CASES[case]
    with socket.create_connection(addr) as s:
        s.sendall(payload)
        reply = read_frame(s)  # the listener explains before it closes
        assert reply is not None, "no ERROR frame came back"
        h, body = reply
        assert h.kind == Kind.ERROR
        assert cause in body["error"]
        assert "Fix:" in body["error"]
        assert read_frame(s) is None  # then the connection is closed
    handler.wait(lambda r: len(r.closed) == 1)
    _, err = handler.closed[0]
    assert isinstance(err, FrameError)
    assert cause in str(err)
    assert "127.0.0.1" in str(err)
    assert not buf.any(), "a refused frame wrote into registered memory"
    assert not handler.data
    assert not handler.controls

    # the listener keeps serving new connections
    cli = make_transport(connections_per_peer=1)
    peer = cli.connect(f"{addr[0]}:{addr[1]}", Recorder(), MemoryRegistry())
    src = np.arange(64, dtype=np.uint8)
    peer.channels[0].send_data(wire.new_transfer_id(), 0, np.array([src.ctypes.data], np.uint64),
                               np.ones(1, np.uint64), np.array([128], np.uint64), np.array([64], np.uint64))
    handler.wait(lambda r: len(r.data) == 1)
    np.testing.assert_array_equal(buf[128:192], src)


def test_valid_frames_before_garbage_are_delivered(server):
    _, addr, handler, _, buf = server
    with socket.create_connection(addr) as s:
        s.sendall(_data(_table((1, 0, 4)), 1, 4) + raw_frame(Kind.HELLO, body=b'{"a":1}') + b"\xff" * 48)
        h, _ = read_frame(s)
        assert h.kind == Kind.ERROR
    handler.wait(lambda r: len(r.closed) == 1)
    assert len(handler.data) == 1
    assert handler.controls[0][1:] == (Kind.HELLO, b"\x01" * 16, {"a": 1})
    assert (buf[:4] == 0xEE).all()
    assert not buf[4:].any()
    assert isinstance(handler.closed[0][1], FrameError)


def test_truncated_header_then_eof(server):
    _, addr, handler, _, buf = server
    with socket.create_connection(addr) as s:
        s.sendall(raw_frame(Kind.HELLO)[:20])
    handler.wait(lambda r: len(r.closed) == 1)
    assert "middle of a frame" in str(handler.closed[0][1])
    assert not buf.any()
