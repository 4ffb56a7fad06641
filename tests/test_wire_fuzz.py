"""Every frame decoder raises FrameError, and nothing else, on any input: arbitrary and mutated bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.wire import Kind

TID = "0123456789abcdef0123456789abcdef"
VALID_BODY = wire.encode_body({"blocks": {"0": [1, 2, 3]}, "start": {"0": 0}, "agent": "a", "tp": [0, 1]})
VALID_HEADER = wire.pack_header(Kind.PULL, TID, body_len=len(VALID_BODY))
VALID_TABLE = wire.pack_table(np.array([1, 1]), np.array([0, 64]), np.array([16, 32]))


def mutate(raw: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(raw)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[: max(0, len(buf) - cut)])


def decoded_or_refused(fn, *args):
    """``fn(*args)``, or None when it raised FrameError; any other exception fails the test."""
    try:
        return fn(*args)
    except FrameError:
        return None


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


@pytest.mark.parametrize("raw", [b"1" * 5000, b"[" * 100_000, b"{\"a\":" * 50_000, b"-" + b"9" * 4400,
                                 b"\xff\xfe", b"NaN", b"[1]"])
def test_decode_body_refuses_hostile_json_with_frame_error(raw):
    with pytest.raises(FrameError, match="frame body"):
        wire.decode_body(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=256))
def test_decode_body_arbitrary_bytes(raw):
    out = decoded_or_refused(wire.decode_body, raw)
    assert out is None or isinstance(out, dict)


@settings(max_examples=150, deadline=None)
@given(edits, st.integers(0, 8))
def test_decode_body_mutated(e, cut):
    out = decoded_or_refused(wire.decode_body, mutate(VALID_BODY, e, cut))
    assert out is None or isinstance(out, dict)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_unpack_header_arbitrary_bytes(raw):
    h = decoded_or_refused(wire.unpack_header, raw)
    assert h is None or (h.body_len <= wire.MAX_BODY and h.n_segments <= wire.MAX_SEGMENTS)


@settings(max_examples=150, deadline=None)
@given(edits, st.integers(0, 2))
def test_unpack_header_mutated(e, cut):
    h = decoded_or_refused(wire.unpack_header, mutate(VALID_HEADER, e, cut))
    assert h is None or isinstance(h.kind, Kind)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=96), st.integers(0, 4), st.integers(0, 2**64 - 1))
def test_unpack_table_arbitrary_bytes(raw, n_segments, payload_len):
    table = decoded_or_refused(wire.unpack_table, raw, n_segments, payload_len)
    assert table is None or int(table["length"].sum(dtype=np.uint64)) == payload_len


@settings(max_examples=150, deadline=None)
@given(edits, st.integers(0, 2), st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 47, 48, 2**64 - 1]))
def test_unpack_table_mutated(e, cut, n_segments, payload_len):
    table = decoded_or_refused(wire.unpack_table, mutate(VALID_TABLE, e, cut), n_segments, payload_len)
    assert table is None or len(table) == n_segments
