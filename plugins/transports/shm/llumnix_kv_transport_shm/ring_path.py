"""The ring path: a host-memory frame's payload through the sender's shared-memory ring.

Messages (TRANSPORT frames): ``ring`` (sender: map my ring) and ``ring_ok`` (receiver: mapped,
or why not), once per channel and direction; per chunk, ``chunk`` (sender: slot k holds the
next n payload bytes) and ``credit`` (receiver: slot k is free again). The sender gathers chunk
k into a free slot while the receiver scatters chunk k-1 out of its slot. The receiver writes
(like tcp), so a refused frame's chunks are drained without being written: no fence is needed.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_transport_shm.local import ShmOptions
from llumnix_kv_transport_shm.paths import F_RING
from llumnix_kv_transport_shm.paths import Incoming
from llumnix_kv_transport_shm.paths import Link
from llumnix_kv_transport_shm.paths import Outgoing
from llumnix_kv_transport_shm.ring import ShmRing
from llumnix_kv_transport_shm.ring import chunk_pieces
from llumnix_kv_transport_shm.ring import is_ring_path
from llumnix_kv_transport_shm.ring import payload_starts


def _field(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if type(value) is not int:
        msg = f"ring message field {key!r} is {value!r}, not an integer"
        raise FrameError(msg)
    return value


class RingPath:
    """This side's ring (sending, created on the first frame with a payload) and the peer's (receiving)."""

    ops = frozenset({"ring", "ring_ok", "chunk", "credit"})

    def __init__(self, link: Link, options: ShmOptions) -> None:
        self._link = link
        self._options = options
        self.out_ring: ShmRing | None = None
        self._in_ring: ShmRing | None = None
        self._free_slots: deque[int] = deque()  # slots of out_ring the receiver handed back
        self._ring_reply: dict[str, Any] | None = None

    # -- sending -----------------------------------------------------------------------------
    def send(self, out: Outgoing) -> int:
        """Returns once the last chunk is in the ring (the receiver scatters it)."""
        link = self._link
        with link.data_lock:
            ring = self._ensure_ring() if out.total else None
            link.send_frame(out.frame(F_RING))
            if ring is None:
                return 0
            starts = payload_starts(out.lengths)
            try:
                pos = 0
                while pos < out.total:
                    link.wait(lambda: bool(self._free_slots), "drain the ring")
                    with link.cond:
                        slot = self._free_slots.popleft()
                    n = min(ring.slot_bytes, out.total - pos)
                    p_src, p_off, p_len = chunk_pieces(out.src, starts, out.lengths, pos, pos + n)
                    native.copy_segments(p_src, p_off + np.uint64(ring.slot_addr(slot)), p_len,
                                         self._options.copy_threads)
                    link.post("chunk", slot=slot, n=n)
                    pos += n
            except BaseException as exc:
                link.abort(exc)
                raise
        return out.total

    def _ensure_ring(self) -> ShmRing:
        """The ring, created and mapped by the peer on first use (data lock held)."""
        if self.out_ring is not None:
            return self.out_ring
        link, opts = self._link, self._options
        ring = ShmRing.create(opts.ring_dir, opts.slots, opts.slot_bytes)
        try:
            with link.cond:
                self._ring_reply = None
            link.post("ring", path=ring.path, slots=ring.slots, slot_bytes=ring.slot_bytes)
            link.wait(lambda: self._ring_reply is not None, "map the ring")
        except BaseException:
            ring.close()
            raise
        finally:
            ring.unlink()
        reply = self._ring_reply or {}
        if not reply.get("ok"):
            ring.close()
            raise TransferError(f"shm peer {link.peer_name} could not map the ring: {reply.get('error')}")
        with link.cond:
            self._free_slots = deque(range(ring.slots))
        self.out_ring = ring
        return ring

    # -- receiving (receive thread) ----------------------------------------------------------
    def receive(self, inc: Incoming) -> None:
        if inc.nbytes == 0:
            self._link.complete(inc)

    def on_message(self, op: str, body: dict[str, Any], inc: Incoming | None) -> None:
        link = self._link
        if op == "ring":
            self._map(body)
        elif op == "chunk":
            self._on_chunk(_field(body, "slot"), _field(body, "n"), inc)
        else:  # replies to this side's sends
            with link.cond:
                if op == "credit":
                    self._free_slots.append(self._credited_slot(body))
                else:
                    self._ring_reply = body
                link.cond.notify_all()

    def _credited_slot(self, body: dict[str, Any]) -> int:
        """The slot a ``credit`` hands back (cond held): one of this side's ring, not free already."""
        slot, ring = body.get("slot"), self.out_ring
        slots = ring.slots if ring is not None else 0
        if type(slot) is not int or not 0 <= slot < slots or slot in self._free_slots:
            msg = (f"ring credit for slot {slot!r}, but this side's ring has {slots} slots and that one is not in "
                   "use: the peer is not a matching shm transport")
            raise FrameError(msg)
        return slot

    def _map(self, body: dict[str, Any]) -> None:
        if self._in_ring is not None:
            self._in_ring.close()
            self._in_ring = None
        path = str(body.get("path"))
        if not is_ring_path(path, self._options.ring_dir, self._link.peer.pid):
            msg = (f"ring set-up names {path!r}, not a ring of the peer process in ring_dir "
                   f"{self._options.ring_dir!r}: both sides must use the same ring_dir")
            raise FrameError(msg)
        try:
            self._in_ring = ShmRing(path, _field(body, "slots"), _field(body, "slot_bytes"), create=False)
        except TransferError as exc:
            self._link.reply("ring_ok", ok=False, error=str(exc))
            return
        self._link.reply("ring_ok", ok=True)

    def _on_chunk(self, slot: int, n: int, inc: Incoming | None) -> None:
        ring = self._in_ring
        if inc is None or inc.mode != F_RING or ring is None:
            msg = "ring chunk without a host-memory frame in progress"
            raise FrameError(msg)
        if not (0 <= slot < ring.slots and 0 < n <= ring.slot_bytes and inc.pos + n <= inc.nbytes):
            msg = f"ring chunk (slot {slot}, {n} bytes) does not fit the ring or the frame"
            raise FrameError(msg)
        if inc.accepted:
            p_dst, p_off, p_len = chunk_pieces(inc.addrs, inc.starts, inc.lengths, inc.pos, inc.pos + n)
            native.copy_segments(p_off + np.uint64(ring.slot_addr(slot)), p_dst, p_len, self._options.copy_threads)
        self._link.reply("credit", slot=slot)
        inc.pos += n
        if inc.pos == inc.nbytes:
            self._link.complete(inc)

    # -- release -----------------------------------------------------------------------------
    def close_receiving(self) -> None:
        if self._in_ring is not None:
            self._in_ring.close()
            self._in_ring = None

    def close_sending(self) -> None:
        if self.out_ring is not None:
            self.out_ring.close()
            self.out_ring = None
