"""The seam between an shm channel and its data paths.

A DATA frame's header and segment table always travel over the channel's socket; the header's
flags say which path its payload takes:

* ``F_RING``: through the sender's shared-memory ring, chunk by chunk
  (:class:`~llumnix_kv_transport_shm.ring_path.RingPath`);
* ``F_CMA`` (host memory, cross-memory attach) and ``F_IPC`` (GPU memory, CUDA IPC): written by
  the sender straight into the receiver's memory, fenced by ``go``/``end``
  (:class:`~llumnix_kv_transport_shm.direct.DirectPath`).

A path's own messages travel as ``TRANSPORT`` frames whose JSON body names the operation; the
channel routes each to the path that declared it in :attr:`DataPath.ops`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Protocol

import numpy as np

from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.wire import Kind
from llumnix_kv_transport_shm.ipc import PeerTable

F_RING = 1 << 0
F_IPC = 1 << 1
F_CMA = 1 << 3


@dataclass(frozen=True)
class Outgoing:
    """One DATA frame to send: checked uint64 segment arrays and where the sources are."""

    transfer_id: str | bytes
    layer: int
    src: np.ndarray
    regions: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    total: int  # payload bytes, the sum of ``lengths``
    gpu: bool  # the destinations are GPU memory of the peer
    ready_event: int | None  # CUDA event the copy waits for (GPU destinations only)
    epoch: int = 0  # the receiver's allocation epoch of the transfer

    def frame(self, flag: int) -> bytes:
        """Header (with the path's ``flag``), segment table and epoch (shm frames carry no digests)."""
        head = wire.pack_header(Kind.DATA, self.transfer_id, layer=self.layer, n_segments=len(self.lengths),
                                payload_len=self.total, flags=flag)
        return head + wire.pack_table(self.regions, self.offsets, self.lengths) + wire.pack_data_ext(self.epoch)


@dataclass
class Incoming:
    """A DATA frame whose header and table arrived and whose payload is still coming."""

    tid: bytes
    layer: int
    mode: int  # the path's flag
    nbytes: int
    n_segments: int
    accepted: bool  # False: fenced, nothing is written
    addrs: np.ndarray  # destination of each segment in this process
    lengths: np.ndarray
    starts: np.ndarray  # offset of each segment in the payload
    pos: int = 0  # payload bytes in place


class Link(Protocol):
    """What a data path may ask of its channel."""

    peer_name: str
    data_lock: threading.Lock  # one outgoing DATA frame at a time, held around a path's ``send``
    cond: threading.Condition  # guards what the receive thread hands to senders; notified on close

    @property
    def closed(self) -> bool: ...

    @property
    def io_timeout(self) -> float:
        """Seconds a peer may take to answer or make progress."""
        ...

    def closed_error(self) -> TransferError:
        """Why sending on the closed channel fails."""
        ...

    @property
    def peer(self) -> PeerTable:
        """The peer's region table, from the handshake."""
        ...

    def send_frame(self, frame: bytes) -> None:
        """A whole frame on the socket (a failure fails the channel)."""

    def post(self, op: str, **fields: Any) -> None:
        """A TRANSPORT message from a sending thread."""

    def reply(self, op: str, **fields: Any) -> None:
        """A TRANSPORT message from the receive thread (a dead peer ends the receive loop)."""

    def wait(self, pred: Callable[[], bool], what: str) -> None:
        """Wait under ``cond`` until ``pred()``; the channel fails if the peer does not ``what`` in time."""

    def abort(self, exc: BaseException) -> None:
        """Fail the channel (unless closed) after ``exc`` mid-frame: the receiver cannot resynchronise."""

    def complete(self, inc: Incoming) -> None:
        """The payload of ``inc`` is in place (or was dropped): deliver it if it was accepted."""


class DataPath(Protocol):
    """How a DATA frame's payload travels, on both sides of a channel."""

    ops: frozenset[str]  # the TRANSPORT messages it handles

    def send(self, out: Outgoing) -> int:
        """Send one frame (taking the link's data lock); returns its payload bytes."""

    def receive(self, inc: Incoming) -> None:
        """The header and table of ``inc`` arrived and were checked; the payload follows."""

    def on_message(self, op: str, body: dict[str, Any], inc: Incoming | None) -> None:
        """One of its TRANSPORT messages; ``inc`` is the frame being received, if any."""

    def close_receiving(self) -> None:
        """Free what receiving holds (receive thread, at exit)."""

    def close_sending(self) -> None:
        """Free what sending holds (receive thread, at exit, data lock held)."""
