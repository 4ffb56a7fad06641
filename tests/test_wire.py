"""Frame format: round trips and every way a frame can be malformed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.wire import Kind

TID = "0123456789abcdef0123456789abcdef"


def raw_header(*, magic=wire.MAGIC, version=wire.VERSION, kind=int(Kind.DATA), tid=bytes(range(16)),
               layer=0, nseg=0, body_len=0, flags=0, payload_len=0) -> bytes:
    return wire.HEADER.pack(magic, version, kind, tid, layer, nseg, body_len, flags, payload_len)


def test_header_is_48_bytes_little_endian():
    assert wire.HEADER_SIZE == 48
    raw = wire.pack_header(Kind.PULL, TID, body_len=7)
    assert raw[:4] == (0x4C4B5631).to_bytes(4, "little")
    assert raw[8:24] == bytes.fromhex(TID)


@given(
    kind=st.sampled_from(list(Kind)),
    tid=st.binary(min_size=16, max_size=16),
    layer=st.integers(0, 2**32 - 1),
    nseg=st.integers(0, wire.MAX_SEGMENTS),
    body_len=st.integers(0, wire.MAX_BODY),
    flags=st.integers(0, 2**32 - 1),
    payload_len=st.integers(0, 2**64 - 1),
)
def test_header_round_trip(kind, tid, layer, nseg, body_len, flags, payload_len):
    if kind != Kind.DATA:
        nseg = payload_len = 0
    raw = wire.pack_header(kind, tid, layer=layer, n_segments=nseg, body_len=body_len, flags=flags,
                           payload_len=payload_len)
    h = wire.unpack_header(raw)
    assert h == wire.FrameHeader(kind, tid, layer, nseg, body_len, flags, payload_len)
    # also from a memoryview, as transports read it
    assert wire.unpack_header(memoryview(bytearray(raw))) == h


def test_transfer_ids():
    tid = wire.new_transfer_id()
    assert len(tid) == 32
    assert wire.tid_bytes(tid) == bytes.fromhex(tid)
    assert wire.new_transfer_id() != tid
    assert wire.unpack_header(wire.pack_header(Kind.ACK, tid)).transfer_id.hex() == tid


@pytest.mark.parametrize(
    ("tid", "match"),
    [
        ("not-hex-at-all", r"not 32 lowercase hex digits"),
        ("abcd", r"not 32 lowercase hex digits"),
        ("00" * 17, r"not 32 lowercase hex digits"),
        ("AB" * 16, r"not 32 lowercase hex digits"),
    ],
)
def test_bad_transfer_id(tid, match):
    with pytest.raises(FrameError, match=match):
        wire.tid_bytes(tid)
    with pytest.raises(FrameError, match=match):
        wire.pack_header(Kind.PULL, tid)


def test_transfer_ids_are_canonicalised_and_raw_ids_checked():
    assert wire.canonical_transfer_id(" " + "AB" * 16 + " ") == "ab" * 16
    with pytest.raises(FrameError, match=r"not 32 hex digits"):
        wire.canonical_transfer_id("abcd")
    with pytest.raises(FrameError, match=r"must be 16 bytes, got 3"):
        wire.pack_header(Kind.PULL, b"abc")


def test_wrapping_segment_lengths_are_refused():
    raw = wire.pack_table(np.zeros(2, np.uint64), np.zeros(2, np.uint64), np.array([2**63, 2**63], np.uint64))
    with pytest.raises(FrameError, match=r"add up to"):
        wire.unpack_table(raw, 2, 0)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (raw_header(magic=0xDEADBEEF), r"bad frame magic 0xdeadbeef \(expected 0x4c4b5631\)"),
        (raw_header(version=1), r"frame version 1, this side speaks 2"),
        (raw_header(kind=0), r"unknown frame kind 0"),
        (raw_header(kind=99), r"unknown frame kind 99"),
        (raw_header(body_len=wire.MAX_BODY + 1), rf"body of {wire.MAX_BODY + 1} bytes exceeds"),
        (raw_header(nseg=wire.MAX_SEGMENTS + 1), rf"announces {wire.MAX_SEGMENTS + 1} segments"),
        (raw_header(kind=int(Kind.PULL), nseg=1), r"PULL frame carries a segment table or payload"),
        (raw_header(kind=int(Kind.DONE), payload_len=5), r"DONE frame carries a segment table or payload"),
        (raw_header()[:47], r"frame header is 47 bytes, expected 48"),
        (raw_header() + b"\0", r"frame header is 49 bytes, expected 48"),
    ],
    ids=["magic", "version", "kind-0", "kind-99", "body", "segments", "pull-table", "done-payload",
         "short", "long"],
)
def test_malformed_header(raw, match):
    with pytest.raises(FrameError, match=match):
        wire.unpack_header(raw)


def test_limits_are_inclusive():
    h = wire.unpack_header(raw_header(body_len=wire.MAX_BODY, nseg=wire.MAX_SEGMENTS))
    assert (h.body_len, h.n_segments) == (wire.MAX_BODY, wire.MAX_SEGMENTS)


@given(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 2**40), st.integers(0, 2**30)), max_size=64))
def test_table_round_trip(segments):
    regions = np.array([s[0] for s in segments], dtype=np.uint64)
    offsets = np.array([s[1] for s in segments], dtype=np.uint64)
    lengths = np.array([s[2] for s in segments], dtype=np.uint64)
    raw = wire.pack_table(regions, offsets, lengths)
    assert len(raw) == 24 * len(segments)
    table = wire.unpack_table(raw, len(segments), sum(s[2] for s in segments))
    np.testing.assert_array_equal(table["region"], regions)
    np.testing.assert_array_equal(table["offset"], offsets)
    np.testing.assert_array_equal(table["length"], lengths)


def test_table_length_mismatch():
    raw = wire.pack_table(np.array([1, 2]), np.array([0, 8]), np.array([8, 8]))
    with pytest.raises(FrameError, match=r"segment table is 48 bytes, expected 72"):
        wire.unpack_table(raw, 3, 16)
    with pytest.raises(FrameError, match=r"segment table is 47 bytes, expected 48"):
        wire.unpack_table(raw[:-1], 2, 16)


def test_table_lengths_must_add_up_to_payload():
    raw = wire.pack_table(np.array([1, 2]), np.array([0, 8]), np.array([8, 8]))
    with pytest.raises(FrameError, match=r"add up to 16 bytes but the header announces 17"):
        wire.unpack_table(raw, 2, 17)
    with pytest.raises(FrameError, match=r"add up to 0 bytes but the header announces 4"):
        wire.unpack_table(b"", 0, 4)
    assert len(wire.unpack_table(b"", 0, 0)) == 0


def test_body_round_trip_and_errors():
    body = {"blocks": {"0": [3, 1, 2]}, "start": {"0": 1}, "note": "ünïcode"}
    assert wire.decode_body(wire.encode_body(body)) == body
    assert wire.encode_body(None) == b""
    assert wire.encode_body({}) == b""
    assert wire.decode_body(b"") == {}
    with pytest.raises(FrameError, match=r"not valid JSON"):
        wire.decode_body(b"{nope")
    with pytest.raises(FrameError, match=r"not valid JSON"):
        wire.decode_body(b"\xff\xfe")
    with pytest.raises(FrameError, match=r"must be a JSON object"):
        wire.decode_body(b"[1, 2]")
