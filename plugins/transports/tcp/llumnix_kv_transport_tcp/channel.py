"""One TCP connection: whole-frame sends under a lock, one receive thread.

The receive thread owns the socket's lifetime: it alone closes the file
descriptor (after taking the send lock), so a native call never sees a
descriptor number that was closed and reused. Anyone may *fail* or *close* the
channel; both only record why and shut the socket down, which wakes the
receive thread and makes pending sends fail at once. ``on_closed`` is called
exactly once, from the receive thread, when it exits.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.uint64)
_ZERO_TID = bytes(16)
_SCRATCH_BYTES = 4 << 20  # reused buffer that swallows the payload of refused DATA frames
_LINGER_S = 1.0  # after an ERROR frame: how long to drain the peer before closing
_LINGER_BYTES = 64 << 20
_JOIN_S = 10.0


class _PeerClosed(Exception):
    """EOF; ``mid_frame`` says whether a frame was cut short."""

    def __init__(self, mid_frame: bool) -> None:
        super().__init__("mid-frame EOF" if mid_frame else "EOF")
        self.mid_frame = mid_frame


def _u64(a: np.ndarray, what: str) -> np.ndarray:
    arr = np.ascontiguousarray(a)
    if arr.ndim != 1:
        msg = f"{what} must be a 1-D array, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.dtype != np.uint64:
        if arr.dtype.kind not in "iu":
            msg = f"{what} must hold integers (numpy.uint64), got dtype {arr.dtype}"
            raise ValueError(msg)
        if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
            msg = f"{what} holds negative values"
            raise ValueError(msg)
        arr = arr.astype(np.uint64)
    return arr


def _with_fix(cause: str) -> str:
    """The ERROR body sent to a peer whose frame was refused: the cause plus how to fix it."""
    if "region" in cause:
        fix = (
            "the sender must only name memory regions (and offsets inside them) that this side "
            "announced in its handshake; redo the handshake after re-registering memory"
        )
    else:
        fix = (
            "make sure the address points to a llumnix-kv tcp transport and that both sides run the "
            "same llumnix-kv release"
        )
    return f"frame refused: {cause}. Fix: {fix}. The connection is closed."


class TcpChannel(Channel):
    """A bidirectional frame channel over one connected TCP socket."""

    def __init__(
        self,
        sock: socket.socket,
        peer_name: str,
        handler: FrameHandler,
        memory: MemoryRegistry,
        io_timeout_s: float,
        on_exit: Callable[[TcpChannel], None] | None = None,
    ) -> None:
        self.peer_name = peer_name
        self._sock = sock
        self._fd = sock.fileno()
        self._handler = handler
        self._memory = memory
        self._io_timeout = float(io_timeout_s)
        self._on_exit = on_exit
        sock.settimeout(self._io_timeout)  # non-blocking fd; Python reads wait at most io_timeout
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closing = False  # close() was called here
        self._closed = False  # the receive thread has finished
        self._error: BaseException | None = None  # first failure seen by a sender
        self._scratch: np.ndarray | None = None
        self._tid = _ZERO_TID  # transfer id of the frame being received (for ERROR replies)
        self._thread = threading.Thread(target=self._recv_loop, name=f"lkv-tcp-recv {peer_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<TcpChannel {self.peer_name} fd={self._fd} {state}>"

    # -- state -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed or self._closing or self._error is not None

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fail(self, error: BaseException) -> None:
        with self._state_lock:
            if self._error is None and not self._closing:
                self._error = error
        self._shutdown()

    def close(self) -> None:
        with self._state_lock:
            self._closing = True
        self._shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_S)
            if self._thread.is_alive():
                log.warning("tcp channel %s: receive thread did not stop within %.0f s",
                            self.peer_name, _JOIN_S)

    def _closed_error(self) -> TransferError:
        why = f" ({self._error})" if self._error is not None else " (closed locally)" if self._closing else ""
        msg = f"tcp channel to {self.peer_name} is closed{why}; reconnect to the peer to send again"
        return TransferError(msg)

    # -- sending -----------------------------------------------------------------------------
    def _send(self, head: bytes, addrs: np.ndarray, lengths: np.ndarray) -> None:
        if self.closed:
            raise self._closed_error()
        with self._send_lock:
            if self.closed:
                raise self._closed_error()
            try:
                native.send_segments(self._fd, head, addrs, lengths, self._io_timeout)
                return
            except TimeoutError as exc:
                msg = (
                    f"sending to tcp peer {self.peer_name} made no progress for {self._io_timeout:g} s "
                    "(peer stalled or network down); the channel is closed"
                )
                err: TransferError = TransferTimeoutError(msg)
                err.__cause__ = exc
            except OSError as exc:
                msg = f"sending to tcp peer {self.peer_name} failed: {exc}; the peer is gone, reconnect"
                err = TransferError(msg)
                err.__cause__ = exc
        self._fail(err)
        raise err

    def send_control(self, kind: Kind, transfer_id: str | bytes, body: dict[str, Any] | None = None) -> None:
        kind = Kind(kind)
        if kind == Kind.DATA:
            msg = "DATA frames carry segments: use send_data, not send_control"
            raise ValueError(msg)
        raw = wire.encode_body(body)
        if len(raw) > wire.MAX_BODY:
            msg = f"control body of {len(raw)} bytes exceeds the {wire.MAX_BODY}-byte frame limit"
            raise ValueError(msg)
        head = wire.pack_header(kind, transfer_id, body_len=len(raw)) + raw
        self._send(head, _EMPTY, _EMPTY)

    def send_data(
        self,
        transfer_id: str | bytes,
        layer: int,
        src_addrs: np.ndarray,
        dst_regions: np.ndarray,
        dst_offsets: np.ndarray,
        lengths: np.ndarray,
        ready_event: int | None = None,
    ) -> int:
        """Send one DATA frame; returns the payload bytes sent (the sum of ``lengths``).

        ``ready_event`` (a CUDA event handle) is synchronised before the sources are read.
        """
        if ready_event is not None:
            native.cuda().event_synchronize(ready_event)
        src = _u64(src_addrs, "src_addrs")
        lens = _u64(lengths, "lengths")
        n = len(lens)
        if not (len(src) == len(dst_regions) == len(dst_offsets) == n):
            msg = (
                f"send_data needs arrays of one length: src_addrs {len(src)}, "
                f"dst_regions {len(dst_regions)}, dst_offsets {len(dst_offsets)}, lengths {n}"
            )
            raise ValueError(msg)
        if n > wire.MAX_SEGMENTS:
            msg = f"{n} segments exceed the {wire.MAX_SEGMENTS}-segment frame limit; split the transfer"
            raise ValueError(msg)
        if not 0 <= layer <= wire.NO_LAYER:
            msg = f"layer {layer} does not fit the frame header (0 .. {wire.NO_LAYER})"
            raise ValueError(msg)
        total = int(lens.sum(dtype=np.uint64)) if n else 0
        head = wire.pack_header(Kind.DATA, transfer_id, layer=layer, n_segments=n, payload_len=total)
        table = wire.pack_table(_u64(dst_regions, "dst_regions"), _u64(dst_offsets, "dst_offsets"), lens)
        self._send(head + table, src, lens)
        return total

    # -- receiving ---------------------------------------------------------------------------
    def _read_exact(self, n: int, mid_frame: bool = True) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise _PeerClosed(mid_frame or got > 0)
            got += k
        return buf

    def _wait_frame(self) -> None:
        """Wait (without a deadline: an idle channel is fine) until the next frame starts."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        while not poller.poll(1000):
            if self._closing:
                return

    def _drop(self, nbytes: int) -> None:
        if self._scratch is None:
            self._scratch = np.empty(_SCRATCH_BYTES, dtype=np.uint8)
        # One native call per GiB: every segment points at the same scratch buffer.
        per_call = 256
        addrs = np.full(per_call, self._scratch.ctypes.data, dtype=np.uint64)
        while nbytes > 0:
            full, rest = divmod(min(nbytes, per_call * _SCRATCH_BYTES), _SCRATCH_BYTES)
            lengths = np.full(full + (1 if rest else 0), _SCRATCH_BYTES, dtype=np.uint64)
            if rest:
                lengths[-1] = rest
            nbytes -= native.recv_segments(self._fd, addrs[: len(lengths)], lengths, self._io_timeout)

    def _one_frame(self) -> bool:
        """Receive and dispatch one frame; False on a clean EOF between frames."""
        self._wait_frame()
        try:
            raw = self._read_exact(wire.HEADER_SIZE, mid_frame=False)
        except _PeerClosed as exc:
            if not exc.mid_frame:
                return False
            raise
        h = wire.unpack_header(raw)
        self._tid = h.transfer_id
        body = self._read_exact(h.body_len) if h.body_len else b""
        if h.kind != Kind.DATA:
            decoded = wire.decode_body(bytes(body))
            try:
                self._handler.on_control(self, h.kind, h.transfer_id, decoded)
            except Exception:
                log.exception("tcp channel %s: on_control handler raised (frame dropped)", self.peer_name)
            return True
        table = wire.unpack_table(self._read_exact(h.n_segments * wire.TABLE_DTYPE.itemsize),
                                  h.n_segments, h.payload_len)
        try:
            accepted = bool(self._handler.accept_data(h.transfer_id, h.layer))
        except Exception:
            log.exception("tcp channel %s: accept_data handler raised (payload dropped)", self.peer_name)
            accepted = False
        if not accepted:
            if h.payload_len:
                self._drop(h.payload_len)
            return True
        lengths = np.ascontiguousarray(table["length"])
        addrs = self._memory.resolve(np.ascontiguousarray(table["region"]),
                                     np.ascontiguousarray(table["offset"]), lengths)
        if h.payload_len:
            native.recv_segments(self._fd, np.ascontiguousarray(addrs, dtype=np.uint64), lengths,
                                 self._io_timeout)
        try:
            self._handler.on_data(self, h.transfer_id, h.layer, h.payload_len, h.n_segments)
        except Exception:
            log.exception("tcp channel %s: on_data handler raised", self.peer_name)
        return True

    def _recv_loop(self) -> None:
        error: BaseException | None = None
        try:
            while self._one_frame():
                self._tid = _ZERO_TID
            error = TransferError(f"tcp peer {self.peer_name} closed the connection")
        except FrameError as exc:
            error = FrameError(f"malformed frame from tcp peer {self.peer_name}: {exc}")
            error.__cause__ = exc
            if not self._closing:
                self._refuse(str(exc))
        except _PeerClosed:
            error = TransferError(f"tcp peer {self.peer_name} closed the connection in the middle of a frame")
        except TimeoutError as exc:
            msg = f"receiving from tcp peer {self.peer_name} made no progress for {self._io_timeout:g} s"
            error = TransferTimeoutError(msg)
            error.__cause__ = exc
        except OSError as exc:
            error = TransferError(f"connection to tcp peer {self.peer_name} lost: {exc}")
            error.__cause__ = exc
        except Exception as exc:
            log.exception("tcp channel %s: receive failed", self.peer_name)
            error = TransferError(f"tcp channel {self.peer_name}: receiving failed with {exc!r}")
            error.__cause__ = exc
        finally:
            self._finish(error)

    def _refuse(self, cause: str) -> None:
        """Tell the peer why its frame was refused, then close gracefully so the ERROR arrives."""
        frame_body = wire.encode_body({"error": _with_fix(cause)})
        frame = wire.pack_header(Kind.ERROR, self._tid, body_len=len(frame_body)) + frame_body
        if self._send_lock.acquire(timeout=1.0):
            try:
                if self._error is None:
                    native.send_segments(self._fd, frame, _EMPTY, _EMPTY, min(self._io_timeout, 2.0))
            except OSError:
                pass
            finally:
                self._send_lock.release()
        # FIN after the ERROR frame; drain what the peer still sends so closing does not reset
        # the connection (a reset would discard the ERROR frame before the peer reads it).
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_S
            drained = 0
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            buf = bytearray(1 << 16)
            while drained < _LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(int(left * 1000) + 1):
                    break
                k = self._sock.recv_into(buf)
                if k == 0:
                    break
                drained += k
        except OSError:
            pass

    def _finish(self, error: BaseException | None) -> None:
        with self._state_lock:
            self._closed = True
            if self._closing:
                error = None
            elif self._error is not None:
                error = self._error
        self._shutdown()
        with self._send_lock:  # pending sends fail fast on the shut-down socket
            self._sock.close()
        try:
            self._handler.on_closed(self, error)
        except Exception:
            log.exception("tcp channel %s: on_closed handler raised", self.peer_name)
        finally:
            # Last: once the transport forgets this channel, close() may return.
            if self._on_exit is not None:
                self._on_exit(self)
