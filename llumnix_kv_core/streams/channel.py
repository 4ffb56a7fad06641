"""A frame channel over one connected socket: whole-frame sends under a lock, one receive thread.

The receive thread owns the socket's lifetime: it alone closes the file descriptor (after
taking the send lock), so a native call never sees a descriptor number that was closed and
reused. Anyone may *fail* or *close* the channel; both only record why and shut the socket
down, which wakes the receive thread and makes pending sends fail at once. ``on_closed`` is
called exactly once, from the receive thread, when it exits.

Subclasses say how a DATA frame's payload travels: :meth:`StreamChannel._send_data` on the
sending side, :meth:`StreamChannel._on_data_header` on the receiving side (after the header
and body were read). ``TRANSPORT`` frames (the transport's own messages) go to
:meth:`StreamChannel._on_transport`, never to the frame handler; :meth:`StreamChannel._admit`
may refuse any other frame first.
"""

from __future__ import annotations

import abc
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

EMPTY = np.zeros(0, dtype=np.uint64)
ZERO_TID = bytes(16)
JOIN_S = 10.0


class PeerClosed(Exception):
    """EOF; ``mid_frame`` says whether a frame was cut short."""

    def __init__(self, mid_frame: bool) -> None:
        super().__init__("mid-frame EOF" if mid_frame else "EOF")
        self.mid_frame = mid_frame


class PeerRefused(Exception):
    """The peer is not acceptable (e.g. at handshake); the message says why."""


def as_u64(a: Any, what: str) -> np.ndarray:
    """``a`` as a contiguous 1-D uint64 array; ValueError naming ``what`` otherwise."""
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


def control_body(transport: str, kind: Kind, body: dict[str, Any] | None) -> bytes:
    """The encoded body of a control frame of ``kind``; ValueError naming ``transport`` if it cannot be sent."""
    if kind == Kind.DATA:
        msg = f"{transport} send_control: DATA frames carry segments, use send_data"
        raise ValueError(msg)
    if kind == Kind.TRANSPORT:
        msg = (f"{transport} send_control: TRANSPORT frames are the transport's own messages; send_control "
               "carries the protocol's kinds")
        raise ValueError(msg)
    raw = wire.encode_body(body)
    if len(raw) > wire.MAX_BODY:
        msg = f"{transport} send_control: a body of {len(raw)} bytes exceeds the {wire.MAX_BODY}-byte frame limit"
        raise ValueError(msg)
    return raw


def checked_segments(transport: str, layer: int, src_addrs: Any, dst_regions: Any, dst_offsets: Any,
                     lengths: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``send_data``'s arguments as uint64 arrays (src, regions, offsets, lengths), checked against the
    frame limits; ValueError naming ``transport`` and what is wrong otherwise."""
    call = f"{transport} send_data"
    src = as_u64(src_addrs, f"{call}: src_addrs")
    lens = as_u64(lengths, f"{call}: lengths")
    regions = as_u64(dst_regions, f"{call}: dst_regions")
    offsets = as_u64(dst_offsets, f"{call}: dst_offsets")
    n = len(lens)
    if not (len(src) == len(regions) == len(offsets) == n):
        msg = (
            f"{call} needs arrays of one length: src_addrs {len(src)}, "
            f"dst_regions {len(regions)}, dst_offsets {len(offsets)}, lengths {n}"
        )
        raise ValueError(msg)
    if n > wire.MAX_SEGMENTS:
        msg = f"{call}: {n} segments exceed the {wire.MAX_SEGMENTS}-segment frame limit; split the transfer"
        raise ValueError(msg)
    if not 0 <= layer <= wire.NO_LAYER:
        msg = f"{call}: layer {layer} does not fit the frame header (0 .. {wire.NO_LAYER})"
        raise ValueError(msg)
    return src, regions, offsets, lens


class StreamChannel(Channel):
    """A bidirectional frame channel over one connected socket.

    Class attributes a subclass sets: ``transport_name`` (the transport's name, which every
    message and thread name carries), ``log`` (its logger), ``stall_hint`` (appended to a send timeout's cause) and
    ``linger_s`` (how long to drain the peer after sending it an ERROR frame).
    """

    transport_name: str
    log: logging.Logger
    stall_hint = ""
    linger_s = 0.0
    linger_bytes = 64 << 20

    def __init__(
        self,
        sock: socket.socket,
        peer_name: str,
        handler: FrameHandler,
        memory: MemoryRegistry,
        io_timeout_s: float,
        on_exit: Callable[[Any], None] | None = None,
    ) -> None:
        self.peer_name = peer_name
        self._sock = sock
        self._fd = sock.fileno()
        self._handler = handler
        self._memory = memory
        self._io_timeout = float(io_timeout_s)
        self._on_exit = on_exit
        sock.settimeout(self._io_timeout)  # non-blocking fd; Python reads wait at most io_timeout
        self._send_lock = threading.Lock()  # whole frames on the socket
        self._state_lock = threading.Lock()
        self._closing = False  # close() was called here
        self._closed = False  # the receive thread has finished
        self._error: BaseException | None = None  # first failure seen by a sender
        self._tid = ZERO_TID  # transfer id of the frame being received (for ERROR replies)
        self._thread = threading.Thread(target=self._recv_loop, name=f"lkv-{self.transport_name}-recv {peer_name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.peer_name} fd={self._fd} {state}>"

    # -- state -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed or self._closing or self._error is not None

    def _shutdown(self) -> None:
        """Shut the socket down (wakes the receive thread); subclasses also wake their waiters."""
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
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                self.log.warning("%s channel %s: receive thread did not stop within %.0f s",
                                 self.transport_name, self.peer_name, JOIN_S)

    def _closed_error(self) -> TransferError:
        why = f" ({self._error})" if self._error is not None else " (closed locally)" if self._closing else ""
        msg = f"{self.transport_name} channel to {self.peer_name} is closed{why}; reconnect to the peer to send again"
        return TransferError(msg)

    # -- sending -----------------------------------------------------------------------------
    def _send(self, head: bytes, addrs: np.ndarray = EMPTY, lengths: np.ndarray = EMPTY) -> None:
        """``head`` then the segments, as one whole frame; a failure fails the channel."""
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
                    f"sending to {self.transport_name} peer {self.peer_name} made no progress for "
                    f"{self._io_timeout:g} s{self.stall_hint}; the channel is closed"
                )
                err: TransferError = TransferTimeoutError(msg)
                err.__cause__ = exc
            except OSError as exc:
                msg = (f"sending to {self.transport_name} peer {self.peer_name} failed: {exc}; the peer is gone, "
                       "reconnect")
                err = TransferError(msg)
                err.__cause__ = exc
        self._fail(err)
        raise err

    def send_control(self, kind: Kind, transfer_id: str | bytes, body: dict[str, Any] | None = None) -> None:
        kind = Kind(kind)
        raw = control_body(self.transport_name, kind, body)
        self._send(wire.pack_header(kind, transfer_id, body_len=len(raw)) + raw)

    def send_data(
        self,
        transfer_id: str | bytes,
        layer: int,
        src_addrs: np.ndarray,
        dst_regions: np.ndarray,
        dst_offsets: np.ndarray,
        lengths: np.ndarray,
        ready_event: int | None = None,
        epoch: int = 0,
    ) -> int:
        """Check the segments, then send one DATA frame (:meth:`_send_data`); returns its payload bytes."""
        src, regions, offsets, lens = checked_segments(self.transport_name, layer, src_addrs, dst_regions,
                                                       dst_offsets, lengths)
        if not 0 <= epoch <= wire.MAX_EPOCH:
            msg = f"{self.transport_name} send_data: epoch {epoch} does not fit the frame (0 .. 2**64 - 1)"
            raise ValueError(msg)
        return self._send_data(transfer_id, layer, src, regions, offsets, lens, ready_event, epoch)

    @abc.abstractmethod
    def _send_data(self, transfer_id: str | bytes, layer: int, src: np.ndarray, regions: np.ndarray,
                   offsets: np.ndarray, lens: np.ndarray, ready_event: int | None, epoch: int) -> int:
        """Send one DATA frame of checked uint64 segment arrays, stamped with ``epoch``; returns the payload
        bytes."""

    # -- receiving ---------------------------------------------------------------------------
    def _read_exact(self, n: int, mid_frame: bool = True) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise PeerClosed(mid_frame or got > 0)
            got += k
        return buf

    def _read_table(self, h: wire.FrameHeader) -> tuple[np.ndarray, int, np.ndarray | None]:
        """The segment table that follows a DATA frame's header, checked against it, then the frame's epoch
        and its digests (None without ``F_DIGEST``)."""
        table = wire.unpack_table(self._read_exact(h.n_segments * wire.TABLE_DTYPE.itemsize),
                                  h.n_segments, h.payload_len)
        epoch, digests = wire.unpack_data_ext(self._read_exact(wire.data_ext_size(h)), h)
        return table, epoch, digests

    def _wait_frame(self) -> None:
        """Wait (without a deadline: an idle channel is fine) until the next frame starts."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        while not poller.poll(1000):
            if self._closing:
                return

    def _in_frame(self) -> bool:
        """Whether a frame's payload is still expected (EOF now cuts it short)."""
        return False

    def _on_transport(self, body: dict[str, Any]) -> None:
        """A ``TRANSPORT`` frame (the transport's own message) arrived; this transport has none."""
        msg = f"TRANSPORT frame, but the {self.transport_name} transport has no messages of its own"
        raise FrameError(msg)

    def _admit(self, h: wire.FrameHeader) -> None:
        """Refuse (FrameError) a frame of the protocol that may not arrive now; after its body was read."""

    @abc.abstractmethod
    def _on_data_header(self, h: wire.FrameHeader) -> None:
        """A DATA frame's header arrived (its table and payload follow): receive or drop it."""

    def _accept(self, h: wire.FrameHeader, epoch: int) -> bool:
        """The handler's ``accept_data``; a handler that raises refuses the payload."""
        try:
            return bool(self._handler.accept_data(h.transfer_id, h.layer, epoch))
        except Exception:
            self.log.exception("%s channel %s: accept_data handler raised (payload dropped)",
                               self.transport_name, self.peer_name)
            return False

    def _deliver_failed(self, transfer_id: bytes, layer: int, error: Exception) -> None:
        """The handler's ``on_data_failed``: the payload is in place but must not be used."""
        self.log.error("%s channel %s: DATA of transfer %s failed: %s", self.transport_name, self.peer_name,
                       transfer_id.hex(), error)
        try:
            self._handler.on_data_failed(self, transfer_id, layer, error)
        except Exception as exc:  # the failure must reach the handler: closing the channel fails its transfers
            msg = f"{self.transport_name} channel {self.peer_name}: on_data_failed handler raised {exc!r}"
            raise TransferError(msg) from exc

    def _deliver(self, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        """The handler's ``on_data``, once the payload is in place."""
        try:
            self._handler.on_data(self, transfer_id, layer, nbytes, n_segments)
        except Exception:
            self.log.exception("%s channel %s: on_data handler raised", self.transport_name, self.peer_name)

    def _one_frame(self) -> bool:
        """Receive and dispatch one frame; False on a clean EOF between frames."""
        self._wait_frame()
        try:
            raw = self._read_exact(wire.HEADER_SIZE, mid_frame=self._in_frame())
        except PeerClosed as exc:
            if not exc.mid_frame:
                return False
            raise
        h = wire.unpack_header(raw)
        self._tid = h.transfer_id
        body = self._read_exact(h.body_len) if h.body_len else b""
        if h.kind == Kind.TRANSPORT:
            self._on_transport(wire.decode_body(bytes(body)))
            return True
        self._admit(h)
        if h.kind != Kind.DATA:
            decoded = wire.decode_body(bytes(body))
            try:
                self._handler.on_control(self, h.kind, h.transfer_id, decoded)
            except Exception:
                self.log.exception("%s channel %s: on_control handler raised (frame dropped)",
                                   self.transport_name, self.peer_name)
            return True
        self._on_data_header(h)
        return True

    def _recv_loop(self) -> None:
        error: BaseException | None = None
        peer = f"{self.transport_name} peer {self.peer_name}"
        try:
            while self._one_frame():
                self._tid = ZERO_TID
            error = TransferError(f"{peer} closed the connection")
            if self._in_frame():
                error = TransferError(f"{peer} closed the connection in the middle of a frame")
        except PeerRefused as exc:
            error = TransferError(f"refused {peer}: {exc}")
        except FrameError as exc:
            error = FrameError(f"malformed frame from {peer}: {exc}")
            error.__cause__ = exc
            if not self._closing:
                self._refuse(str(exc))
        except PeerClosed:
            error = TransferError(f"{peer} closed the connection in the middle of a frame")
        except TimeoutError as exc:
            error = TransferTimeoutError(f"receiving from {peer} made no progress for {self._io_timeout:g} s")
            error.__cause__ = exc
        except OSError as exc:
            error = TransferError(f"connection to {peer} lost: {exc}")
            error.__cause__ = exc
        except Exception as exc:
            self.log.exception("%s channel %s: receive failed", self.transport_name, self.peer_name)
            error = TransferError(f"{self.transport_name} channel {self.peer_name}: receiving failed with {exc!r}")
            error.__cause__ = exc
        finally:
            self._finish(error)

    @abc.abstractmethod
    def _refusal(self, cause: str) -> str:
        """The ERROR body sent to a peer whose frame was refused: the cause plus how to fix it."""

    def _refuse(self, cause: str) -> None:
        """Tell the peer why its frame was refused (best effort), then close gracefully.

        After the ERROR frame comes a FIN; for ``linger_s`` what the peer still sends is drained,
        so closing does not reset the connection (a reset would discard the ERROR frame before
        the peer reads it).
        """
        frame_body = wire.encode_body({"error": self._refusal(cause)})
        frame = wire.pack_header(Kind.ERROR, self._tid, body_len=len(frame_body)) + frame_body
        if self._send_lock.acquire(timeout=1.0):
            try:
                if self._error is None:
                    native.send_segments(self._fd, frame, EMPTY, EMPTY, min(self._io_timeout, 2.0))
            except OSError:
                pass
            finally:
                self._send_lock.release()
        try:
            self._sock.shutdown(socket.SHUT_WR)
            if self.linger_s > 0:
                self._drain()
        except OSError:
            pass

    def _drain(self) -> None:
        deadline = time.monotonic() + self.linger_s
        drained = 0
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        buf = bytearray(1 << 16)
        while drained < self.linger_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                break
            k = self._sock.recv_into(buf)
            if k == 0:
                break
            drained += k

    def _release(self) -> None:
        """Free what the channel holds beyond its socket; runs once, on the receive thread."""

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
        self._release()
        try:
            self._handler.on_closed(self, error)
        except Exception:
            self.log.exception("%s channel %s: on_closed handler raised", self.transport_name, self.peer_name)
        finally:
            # Last: once the transport forgets this channel, close() may return.
            if self._on_exit is not None:
                self._on_exit(self)
