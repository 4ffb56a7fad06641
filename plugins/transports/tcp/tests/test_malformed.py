"""Garbage after valid frames: what came before is delivered, then the listener refuses the rest.

The malformed frames every transport refuses (and those tcp refuses at once) are in the
conformance suite (test_conformance.py).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import payload_digests
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.wire import Kind

REGION_BYTES = 1 << 16


@pytest.fixture
def server(make_transport):
    srv = make_transport(io_timeout_s=5.0)
    memory = MemoryRegistry()
    buf = registered(memory, 1, REGION_BYTES)
    handler = Recorder()
    host, port = srv.listen("127.0.0.1", 0, handler, memory).rsplit(":", 1)
    return (host, int(port)), handler, buf


def test_valid_frames_before_garbage_are_delivered(server):
    addr, handler, buf = server
    table = wire.pack_table(np.ones(1, np.uint64), np.zeros(1, np.uint64), np.array([4], np.uint64))
    data = raw_frame(Kind.DATA, table=table, n_segments=1, payload_len=4,
                     digests=payload_digests(b"\xee" * 4, [4])) + b"\xee" * 4
    with socket.create_connection(addr) as s:
        s.sendall(data + raw_frame(Kind.HELLO, body=b'{"a":1}') + b"\xff" * 48)
        h, _ = read_frame(s)
        assert h.kind == Kind.ERROR
    handler.wait(lambda r: len(r.closed) == 1)
    assert len(handler.data) == 1
    assert handler.controls[0][1:] == (Kind.HELLO, b"\x01" * 16, {"a": 1})
    assert (buf[:4] == 0xEE).all()
    assert not buf[4:].any()
    assert isinstance(handler.closed[0][1], FrameError)
