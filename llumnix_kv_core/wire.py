"""Versioned frame format shared by every byte-stream transport.

A frame is a fixed 48-byte header, an optional JSON control body, an optional
segment table and a payload::

    header   magic u32 | version u16 | kind u16 | transfer_id 16B | layer u32 |
             n_segments u32 | body_len u32 | flags u32 | payload_len u64
    body     body_len bytes of UTF-8 JSON (control frames)
    table    n_segments x (region u64, offset u64, length u64), little endian   (DATA)
    epoch    u64: the receiver's allocation epoch of the transfer                (DATA)
    digests  n_segments x u64: XXH3-64 of each segment, in table order           (DATA with F_DIGEST)
    payload  payload_len bytes = sum(lengths), segment after segment

The receiver validates everything before it writes a byte into registered memory.

Every DATA frame carries an **epoch**: the receiver gives each allocation of a transfer (each
``start`` of it, into the blocks it holds then) a new number and sends it in its PULL body
(``"epoch"``); the sender stamps it on every DATA frame and on its DONE for that pull. A
receiver writes a payload only if the transfer is still being received *with that epoch*:
late or duplicate frames of an allocation it released (failed, cancelled, done, or started
again into other blocks under the same transfer id) are drained to scratch, never written.

The ``flags`` field is shared: bits 0-15 belong to the transport (e.g. how a DATA payload
travels), bits 16-31 to this format. ``F_DIGEST`` (bit 16): the epoch is followed by one
XXH3-64 digest (seed 0, :func:`llumnix_kv_core.native.digest_segments`) per segment, which the
receiver checks once the payload is in place and before it counts the frame: a mismatch fails
the transfer, naming the segment and both digests. A transport that carries digests sets it
when its ``digest`` option is on (tcp); one that does not (shm) never sets it.

Kinds HELLO .. CANCEL are the transfer protocol: a transport hands them to its frame handler.
``TRANSPORT`` frames belong to the transport itself (e.g. the shm transport's handshake, ring
set-up, credits and ``go``/``end`` fence): the JSON body is the transport's own, and the receive
loop routes them to the channel, never to the frame handler. A transport without messages of
its own refuses them.

``VERSION`` changes when a field's layout or meaning changes (2: DATA frames gained the epoch
and the optional digests). Kinds are only ever added, and a
receiver refuses a kind it does not know ("unknown frame kind"), so adding one (as ``TRANSPORT``
was) cannot make a peer misread a frame and needs no new version.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core.errors import FrameError

MAGIC = 0x4C4B5631  # "LKV1"
VERSION = 2
HEADER = struct.Struct("<IHH16sIIIIQ")
HEADER_SIZE = HEADER.size
NO_LAYER = 0xFFFFFFFF
MAX_BODY = 1 << 20
MAX_SEGMENTS = 1 << 20
TABLE_DTYPE = np.dtype([("region", "<u8"), ("offset", "<u8"), ("length", "<u8")])
F_DIGEST = 1 << 16  # DATA: per-segment digests follow the epoch
TRANSPORT_FLAGS = 0xFFFF  # the bits of ``flags`` a transport may use for itself
MAX_EPOCH = (1 << 64) - 1


class Kind(enum.IntEnum):
    """Frame kinds of the transfer protocol."""

    HELLO = 1  # receiver -> sender: identity, compatibility record, memory regions
    HELLO_OK = 2  # sender -> receiver: handshake accepted
    PULL = 3  # receiver -> sender: where to write one transfer
    DATA = 4  # sender -> receiver: payload written into registered memory
    DONE = 5  # sender -> receiver: transfer complete, with totals
    ACK = 6  # receiver -> sender: all data of a transfer is in place
    ERROR = 7  # either side: the transfer (or the connection) failed, body says why
    CANCEL = 8  # receiver -> sender: the receiver no longer wants a transfer
    TRANSPORT = 9  # either side: a transport-private message, for the channel, never the frame handler


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    transfer_id: bytes
    layer: int
    n_segments: int
    body_len: int
    flags: int
    payload_len: int


def new_transfer_id() -> str:
    """A fresh transfer id (32 hex digits), unique across instances."""
    return uuid.uuid4().hex


_CANONICAL_TID = re.compile(r"[0-9a-f]{32}")


def canonical_transfer_id(transfer_id: str) -> str:
    """The canonical form (32 lowercase hex digits) of a user-supplied transfer id."""
    tid = str(transfer_id).strip().lower()
    if not _CANONICAL_TID.fullmatch(tid):
        msg = f"transfer id {transfer_id!r} is not 32 hex digits; use wire.new_transfer_id()"
        raise FrameError(msg)
    return tid


def tid_bytes(transfer_id: str) -> bytes:
    """The 16 wire bytes of a canonical transfer id (as produced by ``canonical_transfer_id``)."""
    if not _CANONICAL_TID.fullmatch(transfer_id):
        msg = f"transfer id {transfer_id!r} is not 32 lowercase hex digits; use wire.new_transfer_id()"
        raise FrameError(msg)
    return bytes.fromhex(transfer_id)


def pack_header(
    kind: Kind,
    transfer_id: str | bytes,
    *,
    layer: int = NO_LAYER,
    n_segments: int = 0,
    body_len: int = 0,
    flags: int = 0,
    payload_len: int = 0,
) -> bytes:
    tid = transfer_id if isinstance(transfer_id, bytes) else tid_bytes(transfer_id)
    if len(tid) != 16:
        msg = f"transfer id must be 16 bytes, got {len(tid)}"
        raise FrameError(msg)
    return HEADER.pack(MAGIC, VERSION, int(kind), tid, layer, n_segments, body_len, flags, payload_len)


def unpack_header(raw: bytes | memoryview) -> FrameHeader:
    """Parse and validate a header; raises FrameError naming what is wrong."""
    if len(raw) != HEADER_SIZE:
        msg = f"frame header is {len(raw)} bytes, expected {HEADER_SIZE}"
        raise FrameError(msg)
    magic, version, kind, tid, layer, nseg, body_len, flags, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        msg = (
            f"bad frame magic 0x{magic:08x} (expected 0x{MAGIC:08x}): the peer is not a llumnix-kv "
            "transport or the stream lost sync; check the peer address and port"
        )
        raise FrameError(msg)
    if version != VERSION:
        msg = (
            f"peer speaks frame version {version}, this side speaks {VERSION}: "
            "install the same llumnix-kv release on both sides"
        )
        raise FrameError(msg)
    try:
        k = Kind(kind)
    except ValueError as exc:
        msg = f"unknown frame kind {kind}"
        raise FrameError(msg) from exc
    if body_len > MAX_BODY:
        msg = f"frame body of {body_len} bytes exceeds the {MAX_BODY}-byte limit"
        raise FrameError(msg)
    if nseg > MAX_SEGMENTS:
        msg = f"frame announces {nseg} segments, more than the {MAX_SEGMENTS} limit"
        raise FrameError(msg)
    if k != Kind.DATA and (nseg or payload_len):
        msg = f"{k.name} frame carries a segment table or payload; only DATA frames may"
        raise FrameError(msg)
    return FrameHeader(k, tid, layer, nseg, body_len, flags, payload_len)


def encode_body(body: dict[str, Any] | None) -> bytes:
    return b"" if not body else json.dumps(body, separators=(",", ":")).encode()


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a control frame's body; FrameError (and nothing else) for any other bytes."""
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        msg = f"frame body is not valid JSON: {exc}"
        raise FrameError(msg) from exc
    except RecursionError as exc:
        msg = "frame body nests JSON too deeply; control bodies are flat objects"
        raise FrameError(msg) from exc
    if not isinstance(out, dict):
        msg = "frame body must be a JSON object"
        raise FrameError(msg)
    return out


def pack_table(regions: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    table = np.empty(len(lengths), dtype=TABLE_DTYPE)
    table["region"] = regions
    table["offset"] = offsets
    table["length"] = lengths
    return table.tobytes()


def unpack_table(raw: bytes | bytearray | memoryview, n_segments: int, payload_len: int) -> np.ndarray:
    """Parse a segment table and check it against the header's payload length."""
    if len(raw) != n_segments * TABLE_DTYPE.itemsize:
        msg = f"segment table is {len(raw)} bytes, expected {n_segments * TABLE_DTYPE.itemsize}"
        raise FrameError(msg)
    table = np.frombuffer(raw, dtype=TABLE_DTYPE)
    lengths = table["length"]
    # The uint64 sum can wrap: it counts only if no length exceeds the payload and a float sum agrees.
    total = int(lengths.sum(dtype=np.uint64)) if n_segments else 0
    if n_segments and (int(lengths.max()) > payload_len or lengths.sum(dtype=np.float64) > payload_len * 1.0001 + 1):
        total = -1
    if total != payload_len:
        msg = f"segment lengths add up to {total} bytes but the header announces {payload_len}"
        raise FrameError(msg)
    return table


def pack_data_ext(epoch: int, digests: np.ndarray | None = None) -> bytes:
    """What follows a DATA frame's segment table: the epoch, then the digests if given (``F_DIGEST``)."""
    head = int(epoch).to_bytes(8, "little")
    return head if digests is None else head + np.ascontiguousarray(digests, dtype="<u8").tobytes()


def data_ext_size(h: FrameHeader) -> int:
    """Bytes between a DATA frame's segment table and its payload."""
    return 8 + (8 * h.n_segments if h.flags & F_DIGEST else 0)


def unpack_data_ext(raw: bytes | bytearray | memoryview, h: FrameHeader) -> tuple[int, np.ndarray | None]:
    """(epoch, digests or None) of a DATA frame, from the ``data_ext_size(h)`` bytes after its table."""
    if len(raw) != data_ext_size(h):
        msg = f"DATA frame extension is {len(raw)} bytes, expected {data_ext_size(h)}"
        raise FrameError(msg)
    epoch = int.from_bytes(bytes(raw[:8]), "little")
    if not h.flags & F_DIGEST:
        return epoch, None
    return epoch, np.frombuffer(raw, dtype="<u8", offset=8).astype(np.uint64)
