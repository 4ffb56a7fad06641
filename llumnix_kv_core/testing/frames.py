"""Helpers of transport tests: a recording frame handler, registered buffers, segment plans, raw frames.

``Recorder`` is a frame handler that records every callback and waits for conditions over
them; ``registered`` allocates and registers a buffer; ``scatter_plan`` / ``expected_copy``
build scattered segment plans and what they must produce; ``raw_frame`` / ``read_frame`` speak
the wire format over a raw socket. The data of the multi-process tests: a sender fills
``MP_BLOCKS * MP_BLOCK`` bytes with ``pattern`` and scatters them by ``mp_plan``; the
receiver's buffer digest must equal ``mp_expected_digest``.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind

WAIT_S = 20.0
MP_BLOCKS = 8192
MP_BLOCK = 4096


class Recorder(FrameHandler):
    """Records every callback; ``wait`` blocks until a predicate over the records holds."""

    def __init__(self, refuse: set[bytes] | None = None,
                 on_control_cb: Callable[[Channel, Kind, bytes, dict[str, Any]], None] | None = None,
                 accept_cb: Callable[[bytes, int, int], bool] | None = None) -> None:
        self.cond = threading.Condition()
        self.refuse = refuse or set()
        self.on_control_cb = on_control_cb
        self.accept_cb = accept_cb
        self.data: list[tuple[Channel, bytes, int, int, int]] = []
        self.controls: list[tuple[Channel, Kind, bytes, dict[str, Any]]] = []
        self.closed: list[tuple[Channel, BaseException | None]] = []
        self.asked: list[tuple[bytes, int, int]] = []
        self.failed: list[tuple[Channel, bytes, int, Exception]] = []

    def accept_data(self, transfer_id: bytes, layer: int, epoch: int) -> bool:
        with self.cond:
            self.asked.append((transfer_id, layer, epoch))
            self.cond.notify_all()
        if self.accept_cb is not None:
            return self.accept_cb(transfer_id, layer, epoch)
        return transfer_id not in self.refuse

    def on_data(self, channel, transfer_id, layer, nbytes, n_segments) -> None:
        with self.cond:
            self.data.append((channel, transfer_id, layer, nbytes, n_segments))
            self.cond.notify_all()

    def on_data_failed(self, channel, transfer_id, layer, error) -> None:
        with self.cond:
            self.failed.append((channel, transfer_id, layer, error))
            self.cond.notify_all()

    def on_control(self, channel, kind, transfer_id, body) -> None:
        with self.cond:
            self.controls.append((channel, kind, transfer_id, body))
            self.cond.notify_all()
        if self.on_control_cb is not None:
            self.on_control_cb(channel, kind, transfer_id, body)

    def on_closed(self, channel, error) -> None:
        with self.cond:
            self.closed.append((channel, error))
            self.cond.notify_all()

    def wait(self, pred: Callable[[Recorder], bool], timeout: float = WAIT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self), timeout):
                msg = (f"condition not met within {timeout} s: data={len(self.data)} "
                       f"controls={len(self.controls)} closed={[(c.peer_name, e) for c, e in self.closed]}")
                raise AssertionError(msg)


def registered(memory: MemoryRegistry, region_id: int, nbytes: int, fill: int | None = 0) -> np.ndarray:
    buf = np.zeros(nbytes, dtype=np.uint8) if fill == 0 else np.full(nbytes, fill, dtype=np.uint8)
    memory.register(MemoryRegion(region_id, buf.ctypes.data, buf.nbytes))
    return buf


def scatter_plan(rng: np.random.Generator, n: int, block: int, jitter: bool = True):
    """``n`` segments of about ``block`` bytes: (src offsets, dst offsets, lengths), destination shuffled.

    Source segment i and destination segment perm[i] live in slots of ``block`` bytes; lengths vary
    (1 .. block) when ``jitter`` so segment boundaries are not aligned.
    """
    lengths = rng.integers(1, block + 1, size=n, dtype=np.uint64) if jitter else np.full(n, block, np.uint64)
    src = np.arange(n, dtype=np.uint64) * np.uint64(block)
    dst = rng.permutation(n).astype(np.uint64) * np.uint64(block)
    return src, dst, lengths


def expected_copy(src_buf: np.ndarray, dst_size: int, src_off, dst_off, lengths,
                  base: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(dst_size, dtype=np.uint8) if base is None else base.copy()
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist(), strict=True):
        out[d:d + n] = src_buf[s:s + n]
    return out


def raw_frame(kind: Kind, *, tid: bytes = b"\x01" * 16, body: bytes = b"", table: bytes = b"",
              n_segments: int = 0, payload_len: int = 0, magic: int = wire.MAGIC,
              version: int = wire.VERSION, layer: int = 0, epoch: int = 0,
              digests: np.ndarray | None = None) -> bytes:
    """A frame's bytes up to its payload; a DATA frame's end with its epoch and ``digests`` (if given)."""
    flags = wire.F_DIGEST if digests is not None else 0
    head = wire.HEADER.pack(magic, version, int(kind), tid, layer, n_segments, len(body), flags, payload_len)
    ext = wire.pack_data_ext(epoch, digests) if kind == Kind.DATA else b""
    return head + body + table + ext


def payload_digests(payload: bytes, lengths: list[int]) -> np.ndarray:
    """The digests of ``payload`` cut into segments of ``lengths``, as a sender computes them."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    starts = np.cumsum([0, *lengths[:-1]], dtype=np.uint64)
    return native.digest_segments(starts + np.uint64(buf.ctypes.data), np.asarray(lengths, dtype=np.uint64))


def read_frame(sock: socket.socket, timeout: float = WAIT_S) -> tuple[wire.FrameHeader, dict] | None:
    """One control frame from a raw socket, or None on EOF."""
    sock.settimeout(timeout)

    def exact(n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            k = sock.recv(n - len(out))
            if not k:
                return None
            out += k
        return out

    head = exact(wire.HEADER_SIZE)
    if head is None:
        return None
    h = wire.unpack_header(head)
    body = exact(h.body_len) if h.body_len else b""
    return h, wire.decode_body(body or b"")


def pattern(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def mp_plan(seed: int):
    rng = np.random.default_rng(seed + 1)
    return scatter_plan(rng, MP_BLOCKS, MP_BLOCK)


def mp_expected_digest(seed: int) -> str:
    src = pattern(seed, MP_BLOCKS * MP_BLOCK)
    s, d, n = mp_plan(seed)
    return hashlib.sha256(expected_copy(src, MP_BLOCKS * MP_BLOCK, s, d, n).tobytes()).hexdigest()
