"""digest_segments: XXH3-64 test vectors of the xxHash specification, native == fallback, argument checks."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from llumnix_kv_core import native
from llumnix_kv_core.native import _fallback


def _native_module():
    try:
        return importlib.import_module("llumnix_kv_core._native")
    except ModuleNotFoundError:
        return None


_NATIVE = _native_module()
needs_native = pytest.mark.skipif(_NATIVE is None, reason="llumnix_kv_core._native is not built")
IMPLS = [pytest.param(_fallback, id="fallback"), pytest.param(_NATIVE, id="native", marks=needs_native)]

# xxHash's sanity test vectors of XXH3_64bits with seed 0: (length, digest) of the prefix of
# ``sanity_buffer`` (one per code path: empty, 1-3, 4-8, 9-16, 17-128 in 3 sizes, 129-240, and
# large inputs ending inside, at and across stripe and block boundaries).
VECTORS = [
    (0, 0x2D06800538D394C2), (1, 0xC44BDFF4074EECDB), (6, 0x27B56A84CD2D7325), (12, 0xA713DAF0DFBB77E7),
    (24, 0xA3FE70BF9D3510EB), (48, 0x397DA259ECBA1F11), (80, 0xBCDEFBBB2C47C90A), (195, 0xCD94217EE362EC3A),
    (403, 0xCDEB804D65C6DEA4), (512, 0x617E49599013CB6B), (2048, 0xDD59E2C3A5F038E0),
    (2099, 0xC6B9D9B3FC9AC765), (2240, 0x6E73A90539CF2948), (2367, 0xCB37AEB9E5D361ED),
]


def sanity_buffer(n: int) -> np.ndarray:
    """xxHash's sanity test buffer: byte i is the top byte of 2654435761 * 11400714785074694797**i mod 2**64."""
    out = np.empty(n, dtype=np.uint8)
    gen = 2654435761
    for i in range(n):
        out[i] = gen >> 56
        gen = (gen * 11400714785074694797) & ((1 << 64) - 1)
    return out


def digests(impl, buf: np.ndarray, offsets, lengths) -> np.ndarray:
    addrs = np.asarray(offsets, dtype=np.uint64) + np.uint64(buf.ctypes.data)
    return impl.digest_segments(addrs, np.asarray(lengths, dtype=np.uint64))


@pytest.mark.parametrize("impl", IMPLS)
def test_spec_test_vectors(impl):
    buf = sanity_buffer(2367)
    lengths = [n for n, _ in VECTORS]
    got = digests(impl, buf, [0] * len(lengths), lengths)
    assert [hex(x) for x in got.tolist()] == [hex(d) for _, d in VECTORS]
    assert got.dtype == np.uint64


@pytest.mark.parametrize("impl", IMPLS)
def test_vectors_hold_at_every_alignment_and_in_any_order(impl):
    buf = np.zeros(2367 + 64, dtype=np.uint8)
    want = np.array([d for _, d in VECTORS], dtype=np.uint64)
    for shift in (1, 3, 8, 63):
        buf[shift:shift + 2367] = sanity_buffer(2367)
        got = digests(impl, buf, [shift] * len(VECTORS), [n for n, _ in VECTORS])
        np.testing.assert_array_equal(got, want)
    order = np.random.default_rng(1).permutation(len(VECTORS))
    got = digests(impl, buf, [63] * len(VECTORS), [VECTORS[i][0] for i in order])
    np.testing.assert_array_equal(got, want[order])


@needs_native
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 3000)), min_size=0, max_size=40))
def test_native_equals_fallback(segments):
    buf = np.random.default_rng(len(segments)).integers(0, 256, size=8192, dtype=np.uint8)
    offsets = [o for o, _ in segments]
    lengths = [min(n, 8192 - o) for o, n in segments]
    np.testing.assert_array_equal(digests(_NATIVE, buf, offsets, lengths), digests(_fallback, buf, offsets, lengths))


@needs_native
@pytest.mark.parametrize("n", [240, 241, 1024, 1025, 1088, 4096 + 17, 1 << 20, (3 << 20) + 5])
def test_native_equals_fallback_on_large_segments(n):
    buf = np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8)
    assert digests(_NATIVE, buf, [0], [n]) == digests(_fallback, buf, [0], [n])


def test_matches_the_xxhash_package_when_installed():
    xxhash = pytest.importorskip("xxhash")
    buf = np.random.default_rng(7).integers(0, 256, size=70000, dtype=np.uint8)
    lengths = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 65536, 70000]
    got = native.digest_segments(np.full(len(lengths), buf.ctypes.data, dtype=np.uint64), lengths)
    assert got.tolist() == [xxhash.xxh3_64_intdigest(buf[:n].tobytes()) for n in lengths]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_flipped_bit_changes_the_digest(impl):
    buf = np.random.default_rng(3).integers(0, 256, size=4096, dtype=np.uint8)
    lengths = [5, 100, 200, 4096]
    before = digests(impl, buf, [0] * 4, lengths)
    buf[3] ^= 0x10
    after = digests(impl, buf, [0] * 4, lengths)
    assert (before != after).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_table_and_bad_arguments(impl):
    assert impl.digest_segments(np.zeros(0, np.uint64), np.zeros(0, np.uint64)).shape == (0,)
    with pytest.raises(ValueError, match="same length"):
        impl.digest_segments(np.zeros(2, np.uint64), np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match=r"addrs\[0\] is a null address"):
        impl.digest_segments(np.zeros(1, np.uint64), np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="dtype uint64"):
        impl.digest_segments(np.zeros(1, np.int64), np.zeros(1, np.uint64))
