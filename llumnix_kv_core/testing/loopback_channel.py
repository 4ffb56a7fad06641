"""One end of a loopback channel: the frames it queues on its peer and the thread that delivers its own.

See :mod:`llumnix_kv_core.testing.loopback` for how frames travel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING
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
from llumnix_kv_core.streams.channel import JOIN_S
from llumnix_kv_core.streams.channel import checked_segments
from llumnix_kv_core.streams.channel import control_body
from llumnix_kv_core.wire import Kind

if TYPE_CHECKING:
    from llumnix_kv_core.testing.loopback import LoopbackTransport

log = logging.getLogger(__name__)

NAME = "loopback"


@dataclass(frozen=True)
class _Control:
    """A control frame queued on the receiving channel."""

    kind: Kind
    tid: bytes
    body: dict[str, Any]
    nbytes = 0  # only DATA counts against the window


@dataclass(frozen=True)
class _Data:
    """A DATA frame queued on the receiving channel: its segment table and staged payload."""

    tid: bytes
    layer: int
    regions: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    payload: np.ndarray
    epoch: int

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes


_Frame = _Control | _Data
_EOF = _Control(Kind.ERROR, bytes(16), {})  # the peer closed: nothing follows


def _tid(transfer_id: str | bytes) -> bytes:
    return transfer_id if isinstance(transfer_id, bytes) else bytes.fromhex(transfer_id)


def _refusal(cause: str) -> str:
    """The ERROR body sent to a peer whose frame was refused: the cause plus how to fix it."""
    return (f"frame refused: {cause}. Fix: the sender must only name memory regions (and offsets inside them) "
            "that this side registered. The connection is closed.")


class LoopbackChannel(Channel):
    """One end of an in-process channel; its delivery thread hands incoming frames to the handler."""

    def __init__(self, transport: LoopbackTransport, peer_name: str, handler: FrameHandler,
                 memory: MemoryRegistry) -> None:
        self.peer_name = peer_name
        self._transport = transport
        self._handler = handler
        self._memory = memory
        self._io_timeout = transport.config.io_timeout_s
        self._window = transport.window_bytes  # queued DATA bytes this end takes before senders wait
        self.remote: LoopbackChannel | None = None  # the other end, set by pair()
        self._cond = threading.Condition()
        self._inbox: deque[_Frame] = deque()
        self._queued = 0  # DATA bytes queued here and not yet handled
        self._closing = False  # close() was called here
        self._error: BaseException | None = None  # first failure seen by a sender
        self._finished = False  # the delivery thread has finished
        self._thread = threading.Thread(target=self._deliver_loop, name=f"lkv-{NAME}-deliver {peer_name}",
                                        daemon=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer_name} {'closed' if self.closed else 'open'}>"

    @property
    def closed(self) -> bool:
        return self._finished or self._closing or self._error is not None

    @property
    def queued_bytes(self) -> int:
        """DATA bytes that reached this end and were not handled yet."""
        return self._queued

    # -- life cycle --------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self._closing or self._error is not None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._join()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None and not self._closing:
                self._error = error
            self._cond.notify_all()

    def _join(self) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                log.warning("%s channel %s: delivery thread did not stop within %.0f s", NAME, self.peer_name, JOIN_S)

    def _closed_error(self) -> TransferError:
        why = f" ({self._error})" if self._error is not None else " (closed locally)" if self._closing else ""
        return TransferError(f"{NAME} channel to {self.peer_name} is closed{why}; reconnect to the peer to send again")

    # -- sending -----------------------------------------------------------------------------
    def _post(self, frame: _Frame) -> None:
        """Queue ``frame`` on the peer, waiting (at most io_timeout_s) for room in its window."""
        if self.closed:
            raise self._closed_error()
        remote = self.remote
        assert remote is not None
        deadline = time.monotonic() + self._io_timeout
        err: TransferError | None = None
        with remote._cond:
            while remote._queued and remote._queued + frame.nbytes > remote._window:
                if self.closed or remote.closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    err = TransferTimeoutError(
                        f"sending to {NAME} peer {self.peer_name} made no progress for {self._io_timeout:g} s "
                        "(the peer does not take its frames); the channel is closed")
                    break
                remote._cond.wait(min(left, 0.1))
            if err is None and not self.closed and not remote.closed:
                remote._inbox.append(frame)
                remote._queued += frame.nbytes
                remote._cond.notify_all()
                return
        if err is None:
            if self.closed:
                raise self._closed_error()
            # As with a stream socket the peer closed: this send fails, but frames the peer sent before
            # closing are still delivered here, up to its end-of-stream.
            msg = f"sending to {NAME} peer {self.peer_name} failed: the peer closed the connection; reconnect"
            raise TransferError(msg)
        self._fail(err)
        raise err

    def send_control(self, kind: Kind, transfer_id: str | bytes, body: dict[str, Any] | None = None) -> None:
        kind = Kind(kind)
        raw = control_body(NAME, kind, body)
        self._post(_Control(kind, _tid(transfer_id), wire.decode_body(raw)))

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
        """Stage the source segments and queue one DATA frame of allocation ``epoch``; returns its payload bytes."""
        src, regions, offsets, lens = checked_segments(NAME, layer, src_addrs, dst_regions, dst_offsets, lengths)
        if self.closed:
            raise self._closed_error()
        if ready_event is not None:
            native.cuda().event_synchronize(ready_event)
        total = int(lens.sum(dtype=np.uint64)) if len(lens) else 0
        payload = np.empty(total, dtype=np.uint8)
        if total:
            starts = np.cumsum(lens, dtype=np.uint64) - lens
            native.copy_segments(src, starts + np.uint64(payload.ctypes.data), lens)
        self._post(_Data(_tid(transfer_id), layer, regions, offsets, lens, payload, int(epoch)))
        return total

    # -- receiving ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def _push_eof(self) -> None:
        with self._cond:
            self._inbox.append(_EOF)
            self._cond.notify_all()

    def _next(self) -> _Frame | None:
        with self._cond:
            while not self._stopping() and (self._transport.paused or not self._inbox):
                self._cond.wait(0.1)
            return None if self._stopping() else self._inbox.popleft()

    def _deliver_loop(self) -> None:
        error: BaseException | None = None
        try:
            while (frame := self._next()) is not None:
                if frame is _EOF:
                    error = TransferError(f"{NAME} peer {self.peer_name} closed the connection")
                    break
                try:
                    self._handle(frame)
                except FrameError as exc:
                    error = FrameError(f"malformed frame from {NAME} peer {self.peer_name}: {exc}")
                    error.__cause__ = exc
                    self._refuse(frame.tid, str(exc))
                    break
                finally:
                    with self._cond:
                        self._queued -= frame.nbytes
                        self._cond.notify_all()
        except Exception as exc:
            log.exception("%s channel %s: delivery failed", NAME, self.peer_name)
            error = TransferError(f"{NAME} channel {self.peer_name}: delivery failed with {exc!r}")
            error.__cause__ = exc
        finally:
            self._finish(error)

    def _handle(self, frame: _Frame) -> None:
        if isinstance(frame, _Control):
            self._callback("on_control", self, frame.kind, frame.tid, frame.body)
            return
        try:
            accepted = bool(self._handler.accept_data(frame.tid, frame.layer, frame.epoch))
        except Exception:
            log.exception("%s channel %s: accept_data handler raised (payload dropped)", NAME, self.peer_name)
            accepted = False
        if not accepted:
            return
        addrs = self._memory.resolve(frame.regions, frame.offsets, frame.lengths)
        if frame.nbytes:
            starts = np.cumsum(frame.lengths, dtype=np.uint64) - frame.lengths
            native.copy_segments(starts + np.uint64(frame.payload.ctypes.data), addrs, frame.lengths)
        self._callback("on_data", self, frame.tid, frame.layer, frame.nbytes, len(frame.lengths))

    def _callback(self, name: str, *args: Any) -> None:
        try:
            getattr(self._handler, name)(*args)
        except Exception:
            log.exception("%s channel %s: %s handler raised", NAME, self.peer_name, name)

    def _refuse(self, tid: bytes, cause: str) -> None:
        """Tell the peer why its frame ``tid`` was refused (best effort); the channel then closes."""
        remote = self.remote
        assert remote is not None
        with remote._cond:
            if not remote.closed:
                remote._inbox.append(_Control(Kind.ERROR, tid, {"error": _refusal(cause)}))
                remote._cond.notify_all()

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._finished = True
            if self._closing:
                error = None
            elif self._error is not None:
                error = self._error
            self._inbox.clear()
            self._queued = 0
            self._cond.notify_all()
        if self.remote is not None:
            self.remote._push_eof()
        self._callback("on_closed", self, error)
        self._transport._forget(self)



def pair(client: LoopbackChannel, server: LoopbackChannel) -> None:
    """Make two ends one channel."""
    client.remote, server.remote = server, client
