"""One TCP connection: frames and their payloads both travel over the socket.

Framing, the receive thread and the channel's life cycle come from
:class:`~llumnix_kv_core.streams.channel.StreamChannel`; this module adds how a DATA
frame's payload moves: straight from the source segments into the socket, and from the
socket into the destination segments (or into scratch, for a refused frame). With ``digest`` on
(the default), every DATA frame carries an XXH3-64 digest of each segment (``wire.F_DIGEST``),
and a received frame is counted only once the bytes in place hash to the sender's digests; a
frame without digests fails its transfer then, as one whose digests differ does.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.streams import digests
from llumnix_kv_core.streams.channel import StreamChannel
from llumnix_kv_core.wire import Kind

_SCRATCH_BYTES = 4 << 20  # reused buffer that swallows the payload of refused DATA frames


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


class TcpChannel(StreamChannel):
    """A bidirectional frame channel over one connected TCP socket."""

    transport_name = "tcp"
    log = logging.getLogger(__name__)
    stall_hint = " (peer stalled or network down)"
    linger_s = 1.0  # after an ERROR frame: how long to drain the peer before closing
    _scratch: np.ndarray | None = None  # allocated on the first refused payload

    def __init__(self, sock: socket.socket, peer_name: str, handler: FrameHandler, memory: MemoryRegistry,
                 io_timeout_s: float, on_exit: Callable[[Any], None] | None = None, *, digest: bool = True) -> None:
        super().__init__(sock, peer_name, handler, memory, io_timeout_s, on_exit)
        self.digest = digest

    def _send_data(self, transfer_id: str | bytes, layer: int, src: np.ndarray, regions: np.ndarray,
                   offsets: np.ndarray, lens: np.ndarray, ready_event: int | None, epoch: int) -> int:
        """Send one DATA frame; returns the payload bytes sent (the sum of ``lengths``).

        ``ready_event`` (a CUDA event handle) is synchronised before the sources are read; with
        ``digest`` the segments are hashed from the sources before they are sent.
        """
        if ready_event is not None:
            native.cuda().event_synchronize(ready_event)
        n = len(lens)
        total = int(lens.sum(dtype=np.uint64)) if n else 0
        sums = native.digest_segments(src, lens) if self.digest else None
        head = wire.pack_header(Kind.DATA, transfer_id, layer=layer, n_segments=n, payload_len=total,
                                flags=wire.F_DIGEST if self.digest else 0)
        self._send(head + wire.pack_table(regions, offsets, lens) + wire.pack_data_ext(epoch, sums), src, lens)
        return total

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

    def _on_data_header(self, h: wire.FrameHeader) -> None:
        table, epoch, sums = self._read_table(h)
        if not self._accept(h, epoch):
            if h.payload_len:
                self._drop(h.payload_len)
            return
        lengths = np.ascontiguousarray(table["length"])
        addrs = np.ascontiguousarray(self._memory.resolve(np.ascontiguousarray(table["region"]),
                                                          np.ascontiguousarray(table["offset"]), lengths),
                                     dtype=np.uint64)
        if h.payload_len:
            native.recv_segments(self._fd, addrs, lengths, self._io_timeout)
        if sums is not None:
            mismatch = digests.check(table, addrs, sums)
            if mismatch is not None:
                self._deliver_failed(h.transfer_id, h.layer, mismatch)
                return
        elif self.digest:
            msg = ("DATA frame without digests: the sender's `digest` option is off while this side's is on; "
                   "set it alike on both instances")
            self._deliver_failed(h.transfer_id, h.layer, TransferError(msg))
            return
        self._deliver(h.transfer_id, h.layer, h.payload_len, h.n_segments)

    def _refusal(self, cause: str) -> str:
        return _with_fix(cause)
