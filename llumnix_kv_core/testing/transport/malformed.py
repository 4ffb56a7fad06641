"""Conformance: garbage on the wire. The listener refuses the frame, leaves memory alone and keeps serving.

Only for transports whose listening address takes raw TCP connections (``raw_socket_frames``).
The frames of ``HEADER_CASES`` are wrong in their header, so every such transport refuses them
the same way; a transport adds the frames it can check at once in ``malformed_frames``.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.transport.base import ConformanceBase
from llumnix_kv_core.testing.transport.base import one_segment
from llumnix_kv_core.wire import Kind

#: Bytes of region 1 of the listener the malformed frames are sent to.
WIRE_REGION_BYTES = 1 << 16

#: name -> (bytes sent on a fresh connection, text the refusal names)
HEADER_CASES: dict[str, tuple[bytes, str]] = {
    "garbage magic": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64, "bad frame magic"),
    "wrong version": (raw_frame(Kind.HELLO, version=wire.VERSION + 1), "frame version"),
    "unknown kind": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, 99, b"\0" * 16, 0, 0, 0, 0, 0),
                     "unknown frame kind"),
    "oversized body": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(Kind.HELLO), b"\0" * 16, 0, 0,
                                        wire.MAX_BODY + 1, 0, 0), "exceeds"),
    "control with payload": (wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(Kind.PULL), b"\0" * 16,
                                              0, 1, 0, 0, 8), "only DATA frames"),
}


class MalformedFrameTests(ConformanceBase):
    #: The frames ``test_malformed_frame_is_refused`` sends, see ``HEADER_CASES``.
    malformed_frames: dict[str, tuple[bytes, str]] = HEADER_CASES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "malformed_frame" in metafunc.fixturenames:
            metafunc.parametrize("malformed_frame", list(self.malformed_frames.values()),
                                 ids=list(self.malformed_frames))

    @pytest.fixture
    def raw_server(self, make_transport):
        """(address as (host, port), handler, registered region 1) of a listener on 127.0.0.1."""
        self.require("raw_socket_frames")
        srv = make_transport(io_timeout_s=5.0)
        memory = MemoryRegistry()
        buf = registered(memory, 1, WIRE_REGION_BYTES)
        handler = Recorder()
        host, port = srv.listen("127.0.0.1", 0, handler, memory).rsplit(":", 1)
        return (host, int(port)), handler, buf

    def test_malformed_frame_is_refused(self, raw_server, make_transport, malformed_frame):
        addr, handler, buf = raw_server
        payload, cause = malformed_frame
        with socket.create_connection(addr) as s:
            s.sendall(payload)
            reply = read_frame(s)  # the listener explains before it closes
            assert reply is not None, "no ERROR frame came back"
            h, body = reply
            assert h.kind == Kind.ERROR
            assert cause in body["error"]
            assert self.refusal_hint in body["error"]
            assert read_frame(s) is None  # then the connection is closed
        handler.wait(lambda r: len(r.closed) == 1)
        _, err = handler.closed[0]
        assert isinstance(err, FrameError)
        assert cause in str(err)
        assert "127.0.0.1" in str(err)
        self.assert_names_transport(err)
        assert not buf.any(), "a refused frame wrote into registered memory"
        assert not handler.data
        assert not handler.controls

        # the listener keeps serving new connections
        cli = make_transport(connections_per_peer=1)
        peer = cli.connect(f"{addr[0]}:{addr[1]}", Recorder(), MemoryRegistry())
        src = np.arange(64, dtype=np.uint8)
        peer.channels[0].send_data(wire.new_transfer_id(), 0, *one_segment(src, 1, 128))
        handler.wait(lambda r: len(r.data) == 1)
        np.testing.assert_array_equal(buf[128:192], src)

    def test_truncated_header_then_eof(self, raw_server):
        addr, handler, buf = raw_server
        with socket.create_connection(addr) as s:
            s.sendall(raw_frame(Kind.HELLO)[:20])
        handler.wait(lambda r: len(r.closed) == 1)
        assert "middle of a frame" in str(handler.closed[0][1])
        assert not buf.any()
