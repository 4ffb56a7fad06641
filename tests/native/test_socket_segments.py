"""send_segments / recv_segments over socketpairs, both implementations crossed."""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time

import numpy as np
import pytest

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
PAIRS = [
    pytest.param(_fallback, _fallback, id="fallback->fallback"),
    pytest.param(_NATIVE, _fallback, id="native->fallback", marks=needs_native),
    pytest.param(_fallback, _NATIVE, id="fallback->native", marks=needs_native),
    pytest.param(_NATIVE, _NATIVE, id="native->native", marks=needs_native),
]
MODES = ["blocking", "nonblocking"]


def _pair(mode: str) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        if mode == "blocking":
            s.settimeout(None)
        else:
            s.settimeout(5.0)  # sets O_NONBLOCK on the fd
    return a, b


def _segments(lengths: list[int], seed: int, gap: int = 3):
    """A source buffer with random bytes and non-overlapping segments in it."""
    lens = np.asarray(lengths, dtype=np.uint64)
    offsets = np.zeros(len(lengths), dtype=np.uint64)
    pos = 0
    for i, n in enumerate(lengths):
        pos += gap
        offsets[i] = pos
        pos += n
    buf = np.random.default_rng(seed).integers(0, 256, size=pos + 1, dtype=np.uint8)
    return buf, offsets + np.uint64(buf.ctypes.data), lens, offsets


def _gather(buf: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> bytes:
    return b"".join(buf[o : o + n].tobytes() for o, n in zip(offsets.tolist(), lens.tolist(), strict=True))


class _Thread(threading.Thread):
    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:
            self.error = e


def _roundtrip(sender, receiver, mode, lengths, header=b"HDR:llumnix\x00", seed=0):
    a, b = _pair(mode)
    try:
        src, src_addrs, lens, src_off = _segments(lengths, seed)
        dst, dst_addrs, _, dst_off = _segments(lengths, seed + 1, gap=5)
        head_buf = np.zeros(len(header), dtype=np.uint8)
        recv_addrs = np.concatenate([np.array([head_buf.ctypes.data], np.uint64), dst_addrs])
        recv_lens = np.concatenate([np.array([len(header)], np.uint64), lens])
        t = _Thread(sender.send_segments, a.fileno(), header, src_addrs, lens, 10.0)
        t.start()
        got = receiver.recv_segments(b.fileno(), recv_addrs, recv_lens, 10.0)
        t.join(30)
        assert not t.is_alive()
        if t.error:
            raise t.error
        total = len(header) + int(lens.sum())
        assert t.result == total
        assert got == total
        assert head_buf.tobytes() == header
        assert _gather(dst, dst_off, lens) == _gather(src, src_off, lens)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("sender", "receiver"), PAIRS)
def test_mixed_segments(sender, receiver, mode):
    rng = np.random.default_rng(7)
    lengths = [int(x) for x in rng.integers(0, 70000, size=200)]
    lengths[::7] = [0] * len(lengths[::7])
    _roundtrip(sender, receiver, mode, lengths)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("sender", "receiver"), PAIRS)
def test_more_segments_than_iov_max(sender, receiver, mode):
    lengths = [(i * 37) % 301 for i in range(5000)]  # includes zero-length segments
    _roundtrip(sender, receiver, mode, lengths, seed=11)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("sender", "receiver"), PAIRS)
def test_big_segment(sender, receiver, mode):
    _roundtrip(sender, receiver, mode, [64 * 1024 * 1024], header=b"", seed=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_zero_length_segments(impl):
    a, b = _pair("nonblocking")
    try:
        zeros = np.zeros(4, dtype=np.uint64)
        assert impl.send_segments(a.fileno(), b"", zeros, zeros, 1.0) == 0
        assert impl.recv_segments(b.fileno(), zeros, zeros, 1.0) == 0
        assert impl.send_segments(a.fileno(), None, zeros[:0], zeros[:0], None) == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_header_only_and_socket_objects(impl):
    a, b = _pair("blocking")
    try:
        assert impl.send_segments(a, memoryview(b"hello"), np.zeros(0, np.uint64), np.zeros(0, np.uint64), 1.0) == 5
        out = np.zeros(5, dtype=np.uint8)
        assert impl.recv_segments(b, np.array([out.ctypes.data], np.uint64), np.array([5], np.uint64), 1.0) == 5
        assert out.tobytes() == b"hello"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_pipe_fds(impl):
    r, w = os.pipe()
    try:
        src, src_addrs, lens, src_off = _segments([10, 0, 2000], seed=3)
        dst, dst_addrs, _, dst_off = _segments([10, 0, 2000], seed=4)
        assert impl.send_segments(w, b"xy", src_addrs, lens, 1.0) == 2012
        head = np.zeros(2, dtype=np.uint8)
        addrs = np.concatenate([np.array([head.ctypes.data], np.uint64), dst_addrs])
        assert impl.recv_segments(r, addrs, np.concatenate([np.array([2], np.uint64), lens]), 1.0) == 2012
        assert head.tobytes() == b"xy"
        assert _gather(dst, dst_off, lens) == _gather(src, src_off, lens)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_peer_closes_mid_receive(impl, mode):
    a, b = _pair(mode)
    try:
        payload = b"x" * 1000
        a.sendall(payload)
        a.close()
        dst = np.zeros(4096, dtype=np.uint8)
        with pytest.raises(ConnectionError, match="after 1000 of 4096 bytes"):
            impl.recv_segments(b.fileno(), np.array([dst.ctypes.data], np.uint64), np.array([4096], np.uint64), 2.0)
        assert dst[:1000].tobytes() == payload
    finally:
        b.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_peer_closes_mid_send(impl, mode):
    a, b = _pair(mode)
    src = np.ones(32 * 1024 * 1024, dtype=np.uint8)

    def reader():
        b.recv(100_000)
        b.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        with pytest.raises(ConnectionError, match="peer closed the connection after"):
            impl.send_segments(
                a.fileno(), b"h", np.array([src.ctypes.data], np.uint64), np.array([src.size], np.uint64), 5.0
            )
    finally:
        t.join()
        a.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_receiver_times_out_without_sender(impl, mode):
    a, b = _pair(mode)
    try:
        dst = np.zeros(16, dtype=np.uint8)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"recv made no progress for 0\.2 s \(0 of 16 bytes received\)"):
            impl.recv_segments(b.fileno(), np.array([dst.ctypes.data], np.uint64), np.array([16], np.uint64), 0.2)
        elapsed = time.monotonic() - start
        assert 0.19 <= elapsed < 0.5 + 0.2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("impl", "mode"),
    [
        pytest.param(_fallback, "nonblocking", id="fallback-nonblocking"),
        pytest.param(_NATIVE, "nonblocking", id="native-nonblocking", marks=needs_native),
        # Only the native core bounds waits on a blocking fd's send (MSG_DONTWAIT).
        pytest.param(_NATIVE, "blocking", id="native-blocking", marks=needs_native),
    ],
)
def test_sender_times_out_when_peer_does_not_read(impl, mode):
    a, b = _pair(mode)
    try:
        src = np.ones(16 * 1024 * 1024, dtype=np.uint8)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"send made no progress for 0\.2 s \(\d+ of 16777216 bytes sent\)"):
            impl.send_segments(
                a.fileno(), b"", np.array([src.ctypes.data], np.uint64), np.array([src.size], np.uint64), 0.2
            )
        assert time.monotonic() - start < 2.0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        ("length_mismatch", ValueError, "same length"),
        ("float_dtype", ValueError, "dtype uint64"),
        ("list_input", ValueError, "numpy.uint64 array"),
        ("null_addr", ValueError, "null address"),
        ("negative_timeout", ValueError, "timeout_s"),
        ("nan_timeout", ValueError, "timeout_s"),
        ("negative_fd", ValueError, "negative"),
        ("str_header", TypeError, "bytes-like"),
    ],
)
def test_bad_arguments(impl, case, exc, match):
    a, b = _pair("nonblocking")
    try:
        buf = np.zeros(8, dtype=np.uint8)
        fd, header = a.fileno(), b""
        addrs = np.array([buf.ctypes.data, buf.ctypes.data + 4], dtype=np.uint64)
        lens = np.array([4, 4], dtype=np.uint64)
        timeout = 1.0
        if case == "length_mismatch":
            lens = lens[:1]
        elif case == "float_dtype":
            addrs = addrs.astype(np.float64)
        elif case == "list_input":
            addrs = addrs.tolist()
        elif case == "null_addr":
            addrs[1] = 0
        elif case == "negative_timeout":
            timeout = -1.0
        elif case == "nan_timeout":
            timeout = float("nan")
        elif case == "negative_fd":
            fd = -1
        elif case == "str_header":
            header = "text"
        with pytest.raises(exc, match=match):
            impl.send_segments(fd, header, addrs, lens, timeout)
        if case != "str_header":
            with pytest.raises(exc, match=match):
                impl.recv_segments(fd, addrs, lens, timeout)
    finally:
        a.close()
        b.close()


def test_facade_roundtrip_with_lists():
    a, b = _pair("nonblocking")
    try:
        src = np.frombuffer(b"abcdefgh", dtype=np.uint8).copy()
        dst = np.zeros(8, dtype=np.uint8)
        n = native.send_segments(a, b"", [src.ctypes.data + 4, src.ctypes.data], [4, 4], 1.0)
        assert n == 8
        assert native.recv_segments(b, [dst.ctypes.data], [8], 1.0) == 8
        assert dst.tobytes() == b"efghabcd"
    finally:
        a.close()
        b.close()
