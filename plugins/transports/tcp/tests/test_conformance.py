"""The transport conformance suite over tcp, with the malformed frames tcp refuses before any handshake."""

from __future__ import annotations

import numpy as np

from llumnix_kv_core import wire
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.transport import HEADER_CASES
from llumnix_kv_core.testing.transport import WIRE_REGION_BYTES
from llumnix_kv_core.testing.transport import TransportConformance
from llumnix_kv_core.wire import Kind


def _table(*segs: tuple[int, int, int]) -> bytes:
    a = np.array(segs, dtype=np.uint64).reshape(-1, 3)
    return wire.pack_table(a[:, 0], a[:, 1], a[:, 2])


def _data(table: bytes, n: int, payload_len: int) -> bytes:
    return raw_frame(Kind.DATA, table=table, n_segments=n, payload_len=payload_len) + b"\xee" * payload_len


BODY_AND_TABLE_CASES = {
    "body not json": (raw_frame(Kind.HELLO, body=b"{not json"), "not valid JSON"),
    "table does not match payload": (_data(_table((1, 0, 100)), 1, 99), "add up to"),
    "table overrun": (_data(_table((1, 0, 16), (1, WIRE_REGION_BYTES - 10, 100)), 2, 116), "overruns region 1"),
    "offset wraps around": (_data(_table((1, 2**64 - 8, 16)), 1, 16), "overruns region 1"),
    "unregistered region": (_data(_table((1, 0, 16), (7, 0, 16)), 2, 32), "region 7"),
}


class TestTcpConformance(TransportConformance):
    transport_name = "tcp"
    killed_sender_error = "lost|closed"  # a reset or an EOF, whichever the kernel reports first
    malformed_frames = {**HEADER_CASES, **BODY_AND_TABLE_CASES}
