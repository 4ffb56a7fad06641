"""Allocation epochs over real tcp, against a prefill side speaking raw frames: DATA and DONE frames of an
earlier allocation of a transfer id (blocks D released, perhaps reassigned) never land or count, and late
duplicates after a load completed are dropped."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core import wire
from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.testing.frames import payload_digests
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id


class RawPrefill:
    """A listening socket that plays P for one D agent connecting with one connection."""

    def __init__(self, d: KVCache) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10.0)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.d = d
        self.layer0 = LayerTable([d.layout]).entries[d.names[0]]
        self.conn: socket.socket | None = None

    def handshake(self) -> None:
        self.conn, _ = self.server.accept()
        _, body = self.expect(Kind.HELLO)
        self.send(Kind.HELLO_OK, bytes(16), {"agent": body["agent"]})

    def expect(self, kind: Kind) -> tuple[wire.FrameHeader, dict]:
        assert self.conn is not None
        reply = read_frame(self.conn, timeout=10.0)
        assert reply is not None, f"D closed the connection instead of sending {kind.name}"
        assert reply[0].kind == kind, (reply[0].kind, reply[1])
        return reply

    def send(self, kind: Kind, tid: bytes, body: dict) -> None:
        assert self.conn is not None
        self.conn.sendall(raw_frame(kind, tid=tid, body=wire.encode_body(body)))

    def block_bytes(self, block: int) -> tuple[int, int]:
        """(offset in D's pool, length) of the first unit of ``block`` of layer 0."""
        t = self.layer0.tensor
        return t.addr - self.d.pool.ctypes.data + block * t.block_stride + t.unit_offsets[0], t.unit_bytes

    def data(self, tid: bytes, block: int, payload: bytes, epoch: int) -> None:
        t = self.layer0.tensor
        table = wire.pack_table(np.array([self.layer0.region_id]),
                                np.array([block * t.block_stride + t.unit_offsets[0]]), np.array([len(payload)]))
        assert self.conn is not None
        self.conn.sendall(raw_frame(Kind.DATA, tid=tid, table=table, n_segments=1, payload_len=len(payload),
                                    layer=self.layer0.region_id, epoch=epoch,
                                    digests=payload_digests(payload, [len(payload)])) + payload)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def decode(make_agent):
    d = KVCache(2, FlashAttnParser(), blocks=48)
    p = RawPrefill(d)
    yield d, make_agent([d.layout], d.signature(), connections=1), p
    p.close()


def test_frames_of_a_released_allocation_never_land(decode):
    d, da, p = decode
    tid = new_transfer_id()
    raw_tid = bytes.fromhex(tid)
    first, second = [5], [9]
    da.receiver.start(tid, p.address, {0: first}, {0: 0})
    p.handshake()
    _, pull1 = p.expect(Kind.PULL)
    assert pull1["blocks"] == {"0": first}
    da.receiver.cancel(tid)  # D gives the transfer up: block 5 goes back to the engine
    p.expect(Kind.CANCEL)
    assert wait_transfer(da, tid)[0] == "failed"

    da.receiver.start(tid, p.address, {0: second}, {0: 0})  # the same transfer id, now into block 9
    _, pull2 = p.expect(Kind.PULL)
    assert pull2["blocks"] == {"0": second}
    assert pull2["epoch"] != pull1["epoch"]

    before = d.pool.copy()
    off5, n = p.block_bytes(5)
    off9, _ = p.block_bytes(9)
    stale, fresh = bytes([0x11]) * n, bytes([0x22]) * n
    p.data(raw_tid, 5, stale, pull1["epoch"])  # late frame of the released allocation
    p.send(Kind.DONE, raw_tid, {"frames": 1, "bytes": n, "epoch": pull1["epoch"]})  # and its DONE
    p.send(Kind.ERROR, raw_tid, {"error": "stale failure", "epoch": pull1["epoch"]})
    p.data(raw_tid, 9, fresh, pull2["epoch"])
    p.send(Kind.DONE, raw_tid, {"frames": 1, "bytes": n, "epoch": pull2["epoch"]})
    assert wait_transfer(da, tid) == ("done", "")
    p.expect(Kind.ACK)
    after = d.pool.view(np.uint8)
    assert bytes(after[off9:off9 + n]) == fresh
    np.testing.assert_array_equal(d.pool[off5:off5 + n], before[off5:off5 + n])  # block 5 untouched
    changed = np.flatnonzero(d.pool != before)
    assert changed.min() >= off9
    assert changed.max() < off9 + n


def test_duplicate_frames_after_the_load_completed_are_dropped(decode):
    d, da, p = decode
    tid = new_transfer_id()
    raw = bytes.fromhex(tid)
    da.receiver.start(tid, p.address, {0: [7]}, {0: 0})
    p.handshake()
    _, pull = p.expect(Kind.PULL)
    off, n = p.block_bytes(7)
    p.data(raw, 7, bytes([0x33]) * n, pull["epoch"])
    p.send(Kind.DONE, raw, {"frames": 1, "bytes": n, "epoch": pull["epoch"]})
    assert wait_transfer(da, tid) == ("done", "")
    p.expect(Kind.ACK)
    # The engine now owns block 7's KV; a duplicate (retried) frame must not rewrite it.
    p.data(raw, 7, bytes([0x44]) * n, pull["epoch"])
    # A later transfer on the same connection shows D read past the duplicate.
    tid2 = new_transfer_id()
    da.receiver.start(tid2, p.address, {0: [8]}, {0: 0})
    _, pull2 = p.expect(Kind.PULL)
    off8, _ = p.block_bytes(8)
    p.data(bytes.fromhex(tid2), 8, bytes([0x55]) * n, pull2["epoch"])
    p.send(Kind.DONE, bytes.fromhex(tid2), {"frames": 1, "bytes": n, "epoch": pull2["epoch"]})
    assert wait_transfer(da, tid2) == ("done", "")
    pool = d.pool.view(np.uint8)
    assert bytes(pool[off:off + n]) == bytes([0x33]) * n
    assert bytes(pool[off8:off8 + n]) == bytes([0x55]) * n
