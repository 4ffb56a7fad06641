"""Conformance: garbage on the wire. The listener refuses the frame, leaves memory alone and keeps serving.

Only for transports whose listening address takes raw TCP connections (``raw_socket_frames``).
The frames of ``HEADER_CASES`` are wrong in their header or JSON body, so every such transport refuses them
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
#: Random and mutated frames ``test_fuzzed_frames_leave_the_listener_serving`` sends, one connection each.
FUZZ_FRAMES = 300


def fuzzed_frames(seed: int, count: int) -> list[bytes]:
    """``count`` frames: random bytes, and valid frames (control, DATA, transport message) with bytes
    changed, cut off or appended."""
    rng = np.random.default_rng(seed)
    body = wire.encode_body({"agent": "fuzz", "blocks": {"0": [1, 2]}, "start": {"0": 0}, "tp": [0, 1]})
    table = wire.pack_table(np.array([1]), np.array([64]), np.array([16]))
    bases = [raw_frame(Kind.HELLO, body=body), raw_frame(Kind.PULL, body=body), raw_frame(Kind.ACK),
             raw_frame(Kind.TRANSPORT, body=wire.encode_body({"op": "credit", "slot": 0})),
             raw_frame(Kind.DATA, table=table, n_segments=1, payload_len=16) + bytes(16)]
    out = []
    for i in range(count):
        if i % 5 == 0:
            out.append(rng.bytes(int(rng.integers(1, 200))))
            continue
        frame = bytearray(bases[int(rng.integers(len(bases)))])
        for pos in rng.integers(0, len(frame), size=int(rng.integers(1, 6))):
            frame[pos] = int(rng.integers(256))
        cut = int(rng.integers(0, 4))
        out.append(bytes(frame[: len(frame) - cut] if cut < 3 else frame + rng.bytes(int(rng.integers(1, 64)))))
    return out

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
    # The body is decoded before any transport looks at the message.
    "JSON integer over the digit limit": (raw_frame(Kind.TRANSPORT, body=b'{"op":' + b"9" * 5000 + b"}"),
                                          "not valid JSON"),
    "deeply nested JSON": (raw_frame(Kind.TRANSPORT, body=b'{"op":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                           "nests JSON too deeply"),
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

    def test_fuzzed_frames_leave_the_listener_serving(self, raw_server, make_transport):
        """Random and mutated frames, each on its own connection: the listener survives every one of them."""
        addr, handler, buf = raw_server
        for frame in fuzzed_frames(seed=7, count=FUZZ_FRAMES):
            with socket.create_connection(addr) as s:
                s.sendall(frame)
        handler.wait(lambda r: len(r.closed) == FUZZ_FRAMES)
        received = len(handler.data)  # a mutated DATA frame may still be a valid one
        buf[:] = 0
        cli = make_transport(connections_per_peer=1)
        peer = cli.connect(f"{addr[0]}:{addr[1]}", Recorder(), MemoryRegistry())
        src = np.arange(64, dtype=np.uint8)
        peer.channels[0].send_data(wire.new_transfer_id(), 0, *one_segment(src, 1, 1024))
        handler.wait(lambda r: len(r.data) == received + 1)
        np.testing.assert_array_equal(buf[1024:1088], src)

    def test_truncated_header_then_eof(self, raw_server):
        addr, handler, buf = raw_server
        with socket.create_connection(addr) as s:
            s.sendall(raw_frame(Kind.HELLO)[:20])
        handler.wait(lambda r: len(r.closed) == 1)
        assert "middle of a frame" in str(handler.closed[0][1])
        assert not buf.any()
