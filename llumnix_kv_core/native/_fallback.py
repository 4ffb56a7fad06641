"""Pure Python/NumPy stand-in for ``llumnix_kv_core._native``.

Same functions, signatures, error types and messages as the compiled module,
only slower: copies are one ``ctypes.memmove`` per segment on the calling
thread, socket transfers use ``os.writev``/``os.readv`` over memoryviews of
the segments with ``select.poll`` for waiting, and digests are XXH3-64 in NumPy
(:mod:`llumnix_kv_core.native._xxh3`), bit-identical to the compiled core's.

One difference: on a *blocking* fd the compiled module still sends with
``MSG_DONTWAIT``, so ``timeout_s`` bounds every wait; here a blocking
``os.writev`` may wait inside the kernel until its whole batch is accepted
(receiving, and everything on non-blocking fds, honours ``timeout_s`` the same
way in both).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import select
import time
from typing import Any

import numpy as np

from llumnix_kv_core.native import _xxh3

__version__ = "fallback"

_U64 = np.dtype(np.uint64)
_U64_MAX = (1 << 64) - 1
# Largest piece handed to one iovec; the kernel moves at most ~2 GiB per call.
_MAX_PIECE = 1 << 30


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        value = -1
    return value if value > 0 else 1024


_IOV_MAX = _iov_max()


def capabilities() -> list[str]:
    """Features this implementation provides."""
    return ["cpu_copy", "socket_io", "digest"]


# --------------------------------------------------------------- validation


def _u64_array(obj: Any, name: str) -> np.ndarray:
    if not isinstance(obj, np.ndarray):
        raise ValueError(
            f"{name} must be a 1-D numpy.uint64 array, got {type(obj).__name__}; convert with "
            "numpy.asarray(x, dtype=numpy.uint64) or call through llumnix_kv_core.native, which accepts lists"
        )
    if obj.dtype != _U64:
        raise ValueError(
            f"{name} must have dtype uint64, got {obj.dtype}; convert with numpy.asarray(x, dtype=numpy.uint64)"
        )
    if obj.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {obj.ndim} dimensions")
    return obj


def _check_same_size(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} and {b_name} must have the same length (got {a.shape[0]} and {b.shape[0]})")


def _checked_total(what: str, addrs: np.ndarray, lengths: np.ndarray) -> int:
    """Validates non-empty segments like the native core; returns the byte total."""
    if lengths.shape[0] == 0:
        return 0
    used = lengths != 0
    bad = np.flatnonzero(used & (addrs == 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}[{i}] is a null address for a segment of {int(lengths[i])} bytes")
    wraps = np.flatnonzero(used & (lengths > (np.uint64(_U64_MAX) - addrs)))
    if wraps.size:
        i = int(wraps[0])
        raise ValueError(f"{what}[{i}] + lengths[{i}] wraps past the end of the address space")
    total = sum(lengths.tolist())
    if total > _U64_MAX:
        raise ValueError("the total of lengths overflows 64 bits")
    return total


def _as_fd(fd: Any) -> int:
    if isinstance(fd, int):
        if fd < 0:
            raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
        return fd
    fileno = getattr(fd, "fileno", None)
    if fileno is None:
        raise TypeError("argument must be an int, or have a fileno() method.")
    return _as_fd(fileno())


def _as_timeout(timeout_s: Any) -> float | None:
    if timeout_s is None:
        return None
    t = float(timeout_s)
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout_s must be a number >= 0 (seconds) or None for no limit, got {timeout_s!r}")
    if t > 1e9:  # the native core treats absurdly long timeouts as none
        return None
    return t


def _header_view(header: Any) -> memoryview:
    if header is None:
        return memoryview(b"")
    try:
        view = memoryview(header)
    except TypeError:
        raise TypeError(
            f"header must be a contiguous bytes-like object (bytes, bytearray, memoryview), got {type(header).__name__}"
        ) from None
    if not view.contiguous:
        raise TypeError(
            f"header must be a contiguous bytes-like object (bytes, bytearray, memoryview), got {type(header).__name__}"
        )
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _segment_views(addrs: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
    views: list[memoryview] = []
    for addr, length in zip(addrs.tolist(), lengths.tolist(), strict=True):
        while length > 0:
            take = min(length, _MAX_PIECE)
            views.append(memoryview((ctypes.c_char * take).from_address(addr)).cast("B"))
            addr += take
            length -= take
    return views


def _fmt_seconds(t: float) -> str:
    return f"{t:g}"


def _wait_ready(fd: int, events: int, timeout: float | None, op: str, done: int, total: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is None:
            wait_ms = None
        else:
            wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        ready = poller.poll(wait_ms)
        if ready:
            if ready[0][1] & select.POLLNVAL:
                raise OSError(errno.EBADF, f"{op} failed: fd {fd} is not open")
            return
        if deadline is not None and time.monotonic() >= deadline:
            if events & select.POLLOUT:
                tail = "sent); the peer is not reading: check the receiver or raise timeout_s"
            else:
                tail = "received); the peer is not sending: check the sender or raise timeout_s"
            raise TimeoutError(f"{op} made no progress for {_fmt_seconds(timeout)} s ({done} of {total} bytes {tail}")


def _advance(views: list[memoryview], index: int, n: int) -> int:
    while n > 0:
        size = len(views[index])
        if n >= size:
            n -= size
            index += 1
        else:
            views[index] = views[index][n:]
            n = 0
    return index


# ----------------------------------------------------------------- functions


def copy_segments(src_addrs: Any, dst_addrs: Any, lengths: Any, num_threads: int = 0) -> None:
    """Copy lengths[i] bytes from src_addrs[i] to dst_addrs[i] for every i (host memory).

    ``num_threads`` is accepted for compatibility and ignored.
    """
    src = _u64_array(src_addrs, "src_addrs")
    dst = _u64_array(dst_addrs, "dst_addrs")
    lens = _u64_array(lengths, "lengths")
    _check_same_size("src_addrs", src, "lengths", lens)
    _check_same_size("dst_addrs", dst, "lengths", lens)
    if int(num_threads) < 0:
        raise ValueError("num_threads must be >= 0 (0 = one per core, capped)")
    _checked_total("src_addrs", src, lens)
    _checked_total("dst_addrs", dst, lens)
    memmove = ctypes.memmove
    for s, d, n in zip(src.tolist(), dst.tolist(), lens.tolist(), strict=True):
        if n:
            memmove(d, s, n)


def digest_segments(addrs: Any, lengths: Any) -> np.ndarray:
    """XXH3-64 (seed 0, default secret) of each segment: a numpy.uint64 array of len(lengths) digests."""
    a = _u64_array(addrs, "addrs")
    lens = _u64_array(lengths, "lengths")
    _check_same_size("addrs", a, "lengths", lens)
    _checked_total("addrs", a, lens)
    return _xxh3.digest_segments(a, lens)


def send_segments(fd: Any, header: Any, addrs: Any, lengths: Any, timeout_s: float | None) -> int:
    """Write header, then every segment in order, to the stream socket fd. Returns bytes written.

    ``timeout_s`` bounds each wait for progress (None: no limit). Raises TimeoutError,
    ConnectionError (peer closed) or OSError.
    """
    f = _as_fd(fd)
    head = _header_view(header)
    a = _u64_array(addrs, "addrs")
    lens = _u64_array(lengths, "lengths")
    _check_same_size("addrs", a, "lengths", lens)
    _checked_total("addrs", a, lens)
    timeout = _as_timeout(timeout_s)

    views = ([head] if len(head) else []) + _segment_views(a, lens)
    total = len(head) + sum(lens.tolist())
    blocking = os.get_blocking(f)
    sent = 0
    index = 0
    while index < len(views):
        if blocking and timeout is not None:
            _wait_ready(f, select.POLLOUT, timeout, "send", sent, total)
        try:
            n = os.writev(f, views[index : index + _IOV_MAX])
        except BlockingIOError:
            _wait_ready(f, select.POLLOUT, timeout, "send", sent, total)
            continue
        except (BrokenPipeError, ConnectionResetError) as e:
            raise type(e)(
                e.errno, f"peer closed the connection after {sent} of {total} bytes were sent ({e.strerror})"
            ) from None
        except OSError as e:
            raise OSError(e.errno, f"send failed after {sent} of {total} bytes: {e.strerror}") from None
        sent += n
        index = _advance(views, index, n)
    return sent


def recv_segments(fd: Any, addrs: Any, lengths: Any, timeout_s: float | None) -> int:
    """Read exactly sum(lengths) bytes from fd into the segments in order. Returns bytes read.

    ``timeout_s`` bounds each wait for progress (None: no limit). Raises TimeoutError,
    ConnectionError (end of stream before all bytes) or OSError.
    """
    f = _as_fd(fd)
    a = _u64_array(addrs, "addrs")
    lens = _u64_array(lengths, "lengths")
    _check_same_size("addrs", a, "lengths", lens)
    total = _checked_total("addrs", a, lens)
    timeout = _as_timeout(timeout_s)

    views = _segment_views(a, lens)
    blocking = os.get_blocking(f)
    got = 0
    index = 0
    while index < len(views):
        if blocking and timeout is not None:
            _wait_ready(f, select.POLLIN, timeout, "recv", got, total)
        try:
            n = os.readv(f, views[index : index + _IOV_MAX])
        except BlockingIOError:
            _wait_ready(f, select.POLLIN, timeout, "recv", got, total)
            continue
        except ConnectionResetError as e:
            raise ConnectionResetError(
                e.errno,
                f"peer closed the connection after {got} of {total} bytes were received ({e.strerror})",
            ) from None
        except OSError as e:
            raise OSError(e.errno, f"recv failed after {got} of {total} bytes: {e.strerror}") from None
        if n == 0:
            raise ConnectionError(
                f"peer closed the connection after {got} of {total} bytes were received (end of stream)"
            )
        got += n
        index = _advance(views, index, n)
    return got
