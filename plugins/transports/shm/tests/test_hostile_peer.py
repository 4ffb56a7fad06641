"""An shm listener against a local peer speaking raw frames: a malformed handshake region table is refused;
ring set-up only after the handshake and only for the peer's rings in ring_dir (never through a symbolic
link); credits only for slots of the ring in use."""

from __future__ import annotations

import os
import socket
import threading
import uuid

import numpy as np
import pytest
from llumnix_kv_transport_shm.local import host_identity

from llumnix_kv_core import wire
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.wire import Kind

REGION = {"region": 1, "device": "cpu", "nbytes": 4096, "addr": 0}


def message(op: str, **fields) -> bytes:
    body = wire.encode_body({"op": op, **fields})
    return wire.pack_header(Kind.TRANSPORT, bytes(16), body_len=len(body)) + body


def next_frame(s: socket.socket) -> tuple[wire.FrameHeader, dict]:
    """The next frame (a DATA frame's table and epoch are read and dropped); fails the test on EOF."""
    reply = read_frame(s, timeout=5.0)
    assert reply is not None, "the listener closed the connection without a word"
    h, body = reply
    want = h.n_segments * wire.TABLE_DTYPE.itemsize + (wire.data_ext_size(h) if h.kind == Kind.DATA else 0)
    while want:
        want -= len(s.recv(want))
    return h, body


@pytest.fixture
def listener(make_transport, tmp_path):
    """(raw socket to a listener whose rings live in tmp_path, its handler)."""
    srv = make_transport(extra={"host_path": "ring", "ring_dir": str(tmp_path)})
    memory = MemoryRegistry()
    registered(memory, 1, 4096)
    handler = Recorder()
    host, port = srv.listen("127.0.0.1", 0, handler, memory).rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        yield s, handler


def handshake(s: socket.socket) -> None:
    s.sendall(message("hello", host=host_identity(), pid=os.getpid(), regions=[REGION]))
    h, body = next_frame(s)
    assert (h.kind, body["op"]) == (Kind.TRANSPORT, "hello_ok")


def assert_refused(s: socket.socket, cause: str) -> None:
    h, body = next_frame(s)
    assert h.kind == Kind.ERROR, f"not refused: {h.kind.name} {body}"
    assert cause in body["error"]


def victim(tmp_path) -> str:
    path = tmp_path.parent / f"victim-{uuid.uuid4().hex[:6]}"
    path.write_bytes(b"\0" * 4096)
    return str(path)


def test_ring_setup_before_handshake_is_refused(listener, tmp_path):
    s, _ = listener
    s.sendall(message("ring", path=victim(tmp_path), slots=1, slot_bytes=4096))
    assert_refused(s, "before the handshake")


def test_ring_setup_outside_ring_dir_is_refused(listener, tmp_path):
    s, _ = listener
    handshake(s)
    s.sendall(message("ring", path=victim(tmp_path), slots=1, slot_bytes=4096))
    assert_refused(s, "not a ring of the peer process")


def test_ring_setup_through_a_symlink_is_not_mapped(listener, tmp_path):
    s, _ = listener
    handshake(s)
    link = tmp_path / f"llumnix-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    link.symlink_to(victim(tmp_path))
    s.sendall(message("ring", path=str(link), slots=1, slot_bytes=4096))
    _, body = next_frame(s)
    assert (body["op"], body["ok"]) == ("ring_ok", False), body


@pytest.mark.parametrize("slot", [10**6, -1, 1, "0"])
def test_credit_for_a_slot_not_in_use_is_refused(listener, slot):
    s, handler = listener
    handshake(s)
    s.sendall(wire.pack_header(Kind.ACK, bytes(16)))  # shows the listener's channel to the test
    handler.wait(lambda r: len(r.controls) == 1)
    chan = handler.controls[0][0]
    src = np.arange(64, dtype=np.uint8)
    u64 = np.uint64
    sender = threading.Thread(target=lambda: chan.send_data(
        wire.new_transfer_id(), 0, np.array([src.ctypes.data], u64), np.array([1], u64), np.array([0], u64),
        np.array([64], u64)), daemon=True)
    sender.start()
    _, body = next_frame(s)
    assert body["op"] == "ring"
    s.sendall(message("ring_ok", ok=True))
    next_frame(s)  # the DATA frame
    _, body = next_frame(s)
    assert (body["op"], body["slot"]) == ("chunk", 0)
    sender.join(5.0)
    s.sendall(message("credit", slot=slot))
    assert_refused(s, "ring credit for slot")
    handler.wait(lambda r: len(r.closed) == 1)


@pytest.mark.parametrize("regions", [[{"region": "x"}], [{"region": 10**12, "device": "cpu", "nbytes": 1}],
                                     [{"region": 1, "device": "cuda:x", "nbytes": 1}], "regions"])
def test_malformed_handshake_region_table_is_refused(listener, regions):
    s, _ = listener
    s.sendall(message("hello", host=host_identity(), pid=os.getpid(), regions=regions))
    assert_refused(s, "malformed shm handshake region table")
