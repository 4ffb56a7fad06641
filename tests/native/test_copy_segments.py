"""copy_segments: native vs fallback parity, threading splits, argument checks."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck
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


def _addr(buf: np.ndarray) -> int:
    return buf.ctypes.data


def _layout(lengths: list[int], gaps: list[int], order: list[int] | None = None) -> tuple[np.ndarray, int]:
    """Offsets of non-overlapping segments placed (in `order`) with gaps; returns offsets, size."""
    n = len(lengths)
    order = list(range(n)) if order is None else order
    offsets = np.zeros(n, dtype=np.uint64)
    pos = 0
    for k, i in enumerate(order):
        pos += gaps[k % len(gaps)] if gaps else 0
        offsets[i] = pos
        pos += lengths[i]
    return offsets, pos + 1


def _expected(src: np.ndarray, dst: np.ndarray, so, do, lengths) -> np.ndarray:
    out = dst.copy()
    for s, d, n in zip(so.tolist(), do.tolist(), lengths, strict=True):
        out[d : d + n] = src[s : s + n]
    return out


@st.composite
def segment_tables(draw):
    n = draw(st.integers(0, 500))
    lengths = draw(st.lists(st.integers(0, 64 * 1024), min_size=n, max_size=n))
    src_gaps = draw(st.lists(st.integers(0, 97), min_size=1, max_size=16))
    dst_gaps = draw(st.lists(st.integers(0, 97), min_size=1, max_size=16))
    order = draw(st.permutations(list(range(n))))
    return lengths, src_gaps, dst_gaps, order


@needs_native
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(table=segment_tables(), num_threads=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2**32 - 1))
def test_parity_native_vs_fallback(table, num_threads, seed):
    lengths, src_gaps, dst_gaps, order = table
    rng = np.random.default_rng(seed)
    so, src_size = _layout(lengths, src_gaps)
    do, dst_size = _layout(lengths, dst_gaps, order)
    src = rng.integers(0, 256, size=src_size, dtype=np.uint8)
    dst_init = rng.integers(0, 256, size=dst_size, dtype=np.uint8)
    dst_native, dst_fallback = dst_init.copy(), dst_init.copy()
    lens = np.asarray(lengths, dtype=np.uint64)

    _NATIVE.copy_segments(so + np.uint64(_addr(src)), do + np.uint64(_addr(dst_native)), lens, num_threads)
    _fallback.copy_segments(so + np.uint64(_addr(src)), do + np.uint64(_addr(dst_fallback)), lens, num_threads)

    np.testing.assert_array_equal(dst_native, dst_fallback)
    np.testing.assert_array_equal(dst_native, _expected(src, dst_init, so, do, lengths))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_threads", [0, 1, 2, 7])
def test_one_huge_segment_is_split(impl, num_threads):
    n = 48 * 1024 * 1024 + 13  # odd size: boundaries fall mid-cache-line
    src = np.random.default_rng(1).integers(0, 256, size=n + 5, dtype=np.uint8)
    dst = np.zeros(n + 7, dtype=np.uint8)
    impl.copy_segments(
        np.array([_addr(src) + 5], dtype=np.uint64),
        np.array([_addr(dst) + 3], dtype=np.uint64),
        np.array([n], dtype=np.uint64),
        num_threads,
    )
    np.testing.assert_array_equal(dst[3 : 3 + n], src[5 : 5 + n])
    assert not dst[:3].any()
    assert not dst[3 + n :].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_many_small_segments_batched(impl):
    count, size = 20000, 100
    src = np.random.default_rng(2).integers(0, 256, size=count * size, dtype=np.uint8)
    dst = np.zeros_like(src)
    perm = np.random.default_rng(3).permutation(count).astype(np.uint64)
    src_addrs = np.uint64(_addr(src)) + perm * np.uint64(size)
    dst_addrs = np.uint64(_addr(dst)) + np.arange(count, dtype=np.uint64) * np.uint64(size)
    impl.copy_segments(src_addrs, dst_addrs, np.full(count, size, dtype=np.uint64))
    expected = src.reshape(count, size)[perm.astype(np.int64)].reshape(-1)
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_zero_length(impl):
    empty = np.zeros(0, dtype=np.uint64)
    impl.copy_segments(empty, empty, empty)
    # Zero-length segments may carry any address, even null.
    impl.copy_segments(np.zeros(3, np.uint64), np.zeros(3, np.uint64), np.zeros(3, np.uint64))


def _good(n=2):
    buf = np.zeros(64, dtype=np.uint8)
    a = np.full(n, _addr(buf), dtype=np.uint64)
    return buf, a, np.ones(n, dtype=np.uint64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("length_mismatch", "same length"),
        ("dst_mismatch", "same length"),
        ("int64_dtype", "dtype uint64"),
        ("two_d", "1-D"),
        ("list_input", "numpy.uint64 array"),
        ("null_src", r"src_addrs\[1\] is a null address"),
        ("null_dst", r"dst_addrs\[0\] is a null address"),
        ("wraps", "wraps past the end"),
        ("negative_threads", "num_threads"),
    ],
)
def test_bad_arguments(impl, case, match):
    buf, a, lens = _good()
    src, dst, threads = a.copy(), a.copy(), 0
    if case == "length_mismatch":
        src = a[:1]
    elif case == "dst_mismatch":
        dst = np.concatenate([a, a])
    elif case == "int64_dtype":
        lens = lens.astype(np.int64)
    elif case == "two_d":
        src = a.reshape(1, 2)
    elif case == "list_input":
        src = a.tolist()
    elif case == "null_src":
        src[1] = 0
    elif case == "null_dst":
        dst[0] = 0
    elif case == "wraps":
        src[0] = np.uint64(2**64 - 1)
    elif case == "negative_threads":
        threads = -1
    with pytest.raises(ValueError, match=match):
        impl.copy_segments(src, dst, lens, threads)
    assert not buf.any()


@needs_native
def test_non_contiguous_array_is_accepted():
    src = np.arange(32, dtype=np.uint8)
    dst = np.zeros(32, dtype=np.uint8)
    addrs = np.zeros(8, dtype=np.uint64)
    addrs[::2] = _addr(src) + np.arange(4, dtype=np.uint64) * np.uint64(8)
    daddrs = np.zeros(8, dtype=np.uint64)
    daddrs[::2] = _addr(dst) + np.arange(4, dtype=np.uint64) * np.uint64(8)
    _NATIVE.copy_segments(addrs[::2], daddrs[::2], np.full(4, 8, dtype=np.uint64))
    np.testing.assert_array_equal(dst, src)


def test_facade_accepts_lists():
    src = np.arange(16, dtype=np.uint8)
    dst = np.zeros(16, dtype=np.uint8)
    native.copy_segments([_addr(src), _addr(src) + 8], [_addr(dst) + 8, _addr(dst)], [8, 8])
    np.testing.assert_array_equal(dst, np.concatenate([src[8:], src[:8]]))


def test_facade_rejects_wrong_dtype_arrays():
    buf = np.zeros(8, dtype=np.uint8)
    a = np.array([_addr(buf)], dtype=np.int64)
    with pytest.raises(ValueError, match="dtype uint64"):
        native.copy_segments(a, a, np.array([1], dtype=np.uint64))


@needs_native
def test_native_releases_gil_and_is_thread_safe():
    import threading

    size = 8 * 1024 * 1024
    rng = np.random.default_rng(4)
    srcs = [rng.integers(0, 256, size=size, dtype=np.uint8) for _ in range(4)]
    dsts = [np.zeros(size, dtype=np.uint8) for _ in range(4)]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                _NATIVE.copy_segments(
                    np.array([_addr(srcs[i])], np.uint64),
                    np.array([_addr(dsts[i])], np.uint64),
                    np.array([size], np.uint64),
                    2,
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, d in zip(srcs, dsts, strict=True):
        np.testing.assert_array_equal(s, d)


@needs_native
def test_thread_pool_survives_fork():
    import os
    import time
    import warnings

    size = 4 * 1024 * 1024
    src = np.full(size, 7, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    args = (np.array([_addr(src)], np.uint64), np.array([_addr(dst)], np.uint64), np.array([size], np.uint64), 4)
    _NATIVE.copy_segments(*args)  # starts the pool in the parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with running threads
        pid = os.fork()
    if pid == 0:  # child: the parent's workers do not exist here
        try:
            dst[:] = 0
            _NATIVE.copy_segments(*args)
            os._exit(0 if int(dst.min()) == 7 else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("copy_segments hung in a forked child")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
