"""One shm channel: frames over a loopback socket, payloads through shared memory or CUDA IPC.

Frames use the core wire format. Three header flags belong to this transport:

* ``F_RING``: a DATA frame whose header and segment table come over the socket while the
  payload follows through the sender's shared-memory ring, chunk by chunk (``chunk`` /
  ``credit`` messages). The receiver scatters each chunk into registered host memory; a
  refused (fenced) frame's chunks are drained without being written.
* ``F_IPC``: a DATA frame into registered GPU memory of the receiver. The receiver checks it
  and answers ``go`` (accepted) or ``go: false`` (fenced) before the sender writes a byte;
  the sender then launches one gather/scatter kernel through its CUDA IPC mapping of the
  receiver's memory, waits for it to finish, and sends ``end``. Only then does the receiver
  count the frame, so completion is never reported before the bytes are in place.
* ``F_CMA``: a DATA frame into registered host memory written in one copy by the kernel
  (Linux cross-memory attach) from the sender's process straight into the receiver's memory;
  the same ``go``/``end`` exchange as ``F_IPC`` fences it.
* ``F_XPORT``: the transport's own messages (handshake, ring set-up, chunk/credit, go/end);
  the JSON body names the operation. They never reach the frame handler.

Framing, the receive thread and the channel's life cycle come from
:class:`~llumnix_kv_core.streams.channel.StreamChannel`: the receive thread owns the socket's
lifetime; ``on_closed`` runs once, from it. A failure in the middle of a DATA frame closes the
channel, on both sides.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.streams.channel import EMPTY
from llumnix_kv_core.streams.channel import JOIN_S
from llumnix_kv_core.streams.channel import ZERO_TID
from llumnix_kv_core.streams.channel import PeerClosed
from llumnix_kv_core.streams.channel import PeerRefused
from llumnix_kv_core.streams.channel import StreamChannel
from llumnix_kv_core.wire import Kind
from llumnix_kv_transport_shm.ipc import PeerTable
from llumnix_kv_transport_shm.ipc import device_index
from llumnix_kv_transport_shm.ipc import export_regions
from llumnix_kv_transport_shm.ipc import local_gpu_sources
from llumnix_kv_transport_shm.ipc import peer_addresses
from llumnix_kv_transport_shm.local import host_identity
from llumnix_kv_transport_shm.ring import ShmRing
from llumnix_kv_transport_shm.ring import chunk_pieces
from llumnix_kv_transport_shm.ring import payload_starts

if TYPE_CHECKING:
    from llumnix_kv_transport_shm.transport import ShmTransport

F_RING = 1 << 0
F_IPC = 1 << 1
F_XPORT = 1 << 2
F_CMA = 1 << 3
_DIRECT = (F_IPC, F_CMA)  # the sender writes the receiver's memory itself, after a "go"

_SPIN_S = 5e-3  # busy-poll a GPU event (GIL released per query) this long before sleeping between polls


@dataclass
class _Incoming:
    """A DATA frame whose header arrived and whose payload is still coming."""

    tid: bytes
    layer: int
    mode: int
    nbytes: int
    n_segments: int
    accepted: bool
    addrs: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    pos: int = 0


class ShmChannel(StreamChannel):
    """Frames over a loopback socket; DATA payloads through the ring, cross-memory attach or CUDA IPC."""

    transport_name = "shm"
    log = logging.getLogger(__name__)

    def __init__(
        self,
        sock: socket.socket,
        peer_name: str,
        handler: FrameHandler,
        memory: MemoryRegistry,
        transport: ShmTransport,
        on_exit: Callable[[ShmChannel], None] | None = None,
    ) -> None:
        self._transport = transport
        self._opts = transport.options
        self._data_lock = threading.Lock()  # one outgoing DATA frame at a time
        self._cond = threading.Condition()  # replies the receive thread hands to senders
        super().__init__(sock, peer_name, handler, memory, transport.config.io_timeout_s, on_exit)
        self._peer: PeerTable | None = None
        self._peer_bases: dict[int, np.ndarray] = {}  # local device -> peer GPU region bases
        self._cma: bool | None = None  # whether cross-memory copies to the peer work (probed once)
        self._out_ring: ShmRing | None = None
        self._ring_reply: dict[str, Any] | None = None
        self._free_slots: deque[int] = deque()
        self._in_ring: ShmRing | None = None
        self._pending: _Incoming | None = None
        self._go: bool | None = None
        self._gpu: tuple[int, int, int] | None = None  # (device, stream, done event)

    # -- life cycle --------------------------------------------------------------------------
    def handshake(self, timeout_s: float) -> None:
        """Connecting side, before ``start``: exchange host identity and region tables."""
        self._xport("hello", host=host_identity(), pid=os.getpid(), regions=export_regions(self._memory))
        self._sock.settimeout(timeout_s)
        try:
            h = wire.unpack_header(self._read_exact(wire.HEADER_SIZE))
            body = wire.decode_body(bytes(self._read_exact(h.body_len))) if h.body_len else {}
        except (PeerClosed, OSError, FrameError) as exc:
            msg = (f"shm peer {self.peer_name} did not complete the handshake within {timeout_s:g} s ({exc}); "
                   "check that an shm transport listens there")
            raise TransferError(msg) from exc
        if not h.flags & F_XPORT or body.get("op") not in ("hello_ok", "refuse"):
            msg = f"shm peer {self.peer_name} answered the handshake with {h.kind.name}: it is not an shm listener"
            raise TransferError(msg)
        if body["op"] == "refuse":
            msg = f"shm peer {self.peer_name} refused the connection: {body.get('error')}"
            raise TransferError(msg)
        self._peer = PeerTable.parse(body.get("regions", []), int(body.get("pid", -1)))
        self._sock.settimeout(self._io_timeout)

    def _shutdown(self) -> None:
        super()._shutdown()
        with self._cond:
            self._cond.notify_all()

    def _xport(self, op: str, **fields: Any) -> None:
        raw = wire.encode_body({"op": op, **fields})
        self._send(wire.pack_header(Kind.HELLO, ZERO_TID, flags=F_XPORT, body_len=len(raw)) + raw)

    def _reply(self, op: str, **fields: Any) -> None:
        """A transport message from the receive thread: a dead peer ends the loop, not a sender's call."""
        raw = wire.encode_body({"op": op, **fields})
        frame = wire.pack_header(Kind.HELLO, ZERO_TID, flags=F_XPORT, body_len=len(raw)) + raw
        with self._send_lock:
            try:
                native.send_segments(self._fd, frame, EMPTY, EMPTY, self._io_timeout)
            except OSError as exc:  # TimeoutError included
                raise PeerClosed(self._pending is not None) from exc

    def _wait(self, pred: Callable[[], bool], deadline: float, what: str) -> None:
        with self._cond:
            while not pred():
                if self.closed:
                    raise self._closed_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    err = TransferTimeoutError(
                        f"shm peer {self.peer_name} did not {what} within {self._io_timeout:g} s; "
                        "the channel is closed")
                    self._fail(err)
                    raise err
                self._cond.wait(min(left, 0.5))

    # -- sending DATA -----------------------------------------------------------------------
    def _send_data(self, transfer_id: str | bytes, layer: int, src: np.ndarray, regions: np.ndarray,
                   offsets: np.ndarray, lens: np.ndarray, ready_event: int | None) -> int:
        """Send one DATA frame; returns the payload bytes (the sum of ``lengths``).

        Host destinations: returns once the last chunk is in the ring (the receiver scatters
        it). GPU destinations: returns once the kernel that wrote them has finished and the
        receiver was told. ``ready_event`` (a CUDA event handle) is waited for on the GPU before
        the copy starts; for host destinations it is synchronised first.
        """
        n = len(lens)
        if self.closed:
            raise self._closed_error()
        assert self._peer is not None, "send_data before the handshake"
        kinds = self._peer.kinds_of(regions)
        if n and not kinds.all():
            rid = int(regions[np.argmin(kinds)])
            msg = (f"segment names region {rid} of the peer, which it did not announce at handshake "
                   f"(it announced {sorted(self._peer.entries)})")
            raise ValueError(msg)
        total = int(lens.sum(dtype=np.uint64)) if n else 0
        head = wire.pack_header(Kind.DATA, transfer_id, layer=layer, n_segments=n, payload_len=total,
                                flags=F_IPC if n and kinds[0] == 2 else F_RING)
        if n and (kinds == 2).any():
            if not (kinds == 2).all():
                msg = "one frame mixes host and GPU destination regions; send one frame per memory kind"
                raise ValueError(msg)
            return self._send_gpu(head, src, regions, offsets, lens, total, ready_event)
        if ready_event is not None:
            native.cuda().event_synchronize(ready_event)
        if total and self._use_cma():
            head = wire.pack_header(Kind.DATA, transfer_id, layer=layer, n_segments=n, payload_len=total,
                                    flags=F_CMA)
            return self._send_cma(head, src, regions, offsets, lens, total)
        return self._send_ring(head, src, regions, offsets, lens, total)

    # -- host memory: one copy by the kernel ---------------------------------------------------
    def _use_cma(self) -> bool:
        if self._cma is None:
            path = self._opts.host_path
            self._cma = False
            if path != "ring":
                why = self._probe_cma()
                if why is None:
                    self._cma = True
                elif path == "cma":
                    msg = f"host_path 'cma' cannot reach shm peer {self.peer_name}: {why}"
                    raise TransferError(msg)
                else:
                    self.log.info("shm channel %s: host memory moves through the ring: %s", self.peer_name, why)
        return self._cma

    def _probe_cma(self) -> str | None:
        """None if this process can copy into the peer's registered host memory, else why not."""
        assert self._peer is not None
        if not native.has("cma"):
            return "the compiled core lacks cross-memory copies"
        probe = next((int(a) for a in self._peer.host_addresses() if a), 0)
        if not probe or self._peer.pid <= 0:
            return "the peer announced no host memory"
        scratch = np.zeros(1, np.uint8)
        try:  # a one-byte read: the same permission check as a write, and harmless
            native.cma_copy(self._peer.pid, False, np.array([scratch.ctypes.data], np.uint64),
                            np.array([probe], np.uint64), np.ones(1, np.uint64), 1)
        except OSError as exc:
            return str(exc)
        return None

    def _check_fits(self, regions: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> None:
        """ValueError unless every segment lies inside the peer's region it names."""
        assert self._peer is not None
        ends = offsets + lens
        sizes = self._peer.nbytes[regions]
        over = (ends > sizes) | (ends < offsets)
        if over.any():
            i = int(np.argmax(over))
            msg = (f"segment {i} [{int(offsets[i])}, +{int(lens[i])}) overruns region {int(regions[i])} of the peer "
                   f"({int(sizes[i])} bytes)")
            raise ValueError(msg)

    def _send_cma(self, head, src, regions, offsets, lens, total) -> int:
        assert self._peer is not None
        self._check_fits(regions, offsets, lens)
        dst = self._peer.host_addresses()[regions] + offsets
        table = wire.pack_table(regions, offsets, lens)
        pid = self._peer.pid
        with self._data_lock:
            self._send_direct(head + table, "accept the frame",
                              lambda: native.cma_copy(pid, True, src, dst, lens, self._opts.cma_threads))
        return total

    def _send_direct(self, frame: bytes, what: str, write: Callable[[], object]) -> None:
        """Header and table of a directly written frame, ``write`` once the receiver says ``go``, then ``end``.

        Nothing is written on ``go: false``. The caller holds ``_data_lock``; a failure after the
        header fails the channel (the receiver cannot resynchronise).
        """
        with self._cond:
            self._go = None
        self._send(frame)
        try:
            self._wait(lambda: self._go is not None, time.monotonic() + self._io_timeout, what)
            if self._go:
                write()
            self._xport("end")
        except BaseException as exc:
            if not self.closed:
                self._fail(exc if isinstance(exc, TransferError) else TransferError(str(exc)))
            raise

    # -- host memory: the ring -------------------------------------------------------------
    def _ensure_ring(self) -> ShmRing:
        if self._out_ring is not None:
            return self._out_ring
        ring = ShmRing.create(self._opts.ring_dir, self._opts.slots, self._opts.slot_bytes)
        try:
            with self._cond:
                self._ring_reply = None
            self._xport("ring", path=ring.path, slots=ring.slots, slot_bytes=ring.slot_bytes)
            self._wait(lambda: self._ring_reply is not None, time.monotonic() + self._io_timeout, "map the ring")
        except BaseException:
            ring.close()
            raise
        finally:
            ring.unlink()
        reply = self._ring_reply or {}
        if not reply.get("ok"):
            ring.close()
            raise TransferError(f"shm peer {self.peer_name} could not map the ring: {reply.get('error')}")
        with self._cond:
            self._free_slots = deque(range(ring.slots))
        self._out_ring = ring
        return ring

    def _send_ring(self, head, src, regions, offsets, lens, total) -> int:
        table = wire.pack_table(regions, offsets, lens)
        with self._data_lock:
            ring = self._ensure_ring() if total else None
            self._send(head + table)
            if ring is None:
                return 0
            starts = payload_starts(lens)
            try:
                pos = 0
                while pos < total:
                    self._wait(lambda: bool(self._free_slots), time.monotonic() + self._io_timeout,
                               "drain the ring")
                    with self._cond:
                        slot = self._free_slots.popleft()
                    n = min(ring.slot_bytes, total - pos)
                    p_src, p_off, p_len = chunk_pieces(src, starts, lens, pos, pos + n)
                    native.copy_segments(p_src, p_off + np.uint64(ring.slot_addr(slot)), p_len,
                                         self._opts.copy_threads)
                    self._xport("chunk", slot=slot, n=n)
                    pos += n
            except BaseException as exc:
                if not self.closed:  # mid-frame: the receiver cannot resynchronise
                    self._fail(exc if isinstance(exc, TransferError) else TransferError(str(exc)))
                raise
        return total

    # -- GPU memory: CUDA IPC + one kernel -------------------------------------------------
    def _gpu_for(self, device: int) -> tuple[Any, int, int]:
        cuda = native.cuda()
        cuda.set_device(device)
        if self._gpu is None or self._gpu[0] != device:
            if self._gpu is not None:
                msg = f"this channel already sends from cuda:{self._gpu[0]}; use one channel per source GPU"
                raise TransferError(msg)
            self._gpu = (device, cuda.stream_create(), cuda.event_create())
        return cuda, self._gpu[1], self._gpu[2]

    def _wait_event(self, cuda: Any, event: int, deadline: float) -> None:
        t0 = time.monotonic()
        pause = 0.0
        while not cuda.event_query(event):
            now = time.monotonic()
            if self.closed:
                raise self._closed_error()
            if now > deadline:
                msg = f"GPU copy to shm peer {self.peer_name} did not finish within {self._io_timeout:g} s"
                raise TransferTimeoutError(msg)
            if now - t0 > _SPIN_S:
                pause = min(max(pause * 2, 20e-6), 1e-3)
                time.sleep(pause)

    def _send_gpu(self, head, src, regions, offsets, lens, total, ready_event) -> int:
        assert self._peer is not None
        device = local_gpu_sources(self._memory, src, lens)
        self._check_fits(regions, offsets, lens)
        table = wire.pack_table(regions, offsets, lens)
        with self._data_lock:
            cuda, stream, done = self._gpu_for(device)
            bases = self._peer_bases.get(device)
            if bases is None:
                bases = self._peer_bases[device] = peer_addresses(self._peer, self._transport.mappings, device)
            dst = bases[regions] + offsets

            def write() -> None:
                if ready_event is not None:
                    cuda.stream_wait_event(stream, ready_event)
                cuda.copy_segments(src, dst, lens, stream)
                cuda.event_record(done, stream)
                self._wait_event(cuda, done, time.monotonic() + self._io_timeout)

            self._send_direct(head + table, "accept the GPU frame", write)
        return total

    # -- receiving ---------------------------------------------------------------------------
    def _in_frame(self) -> bool:
        return self._pending is not None

    def _intercept(self, h: wire.FrameHeader, body: bytes | bytearray) -> bool:
        """Transport messages never reach the handler; nothing else may precede the handshake."""
        if h.flags & F_XPORT:
            self._on_xport(wire.decode_body(bytes(body)))
            return True
        if self._peer is None:
            msg = f"{h.kind.name} frame before the shm handshake: the peer is not an shm transport"
            raise FrameError(msg)
        return False

    def _on_data_header(self, h: wire.FrameHeader) -> None:
        if self._pending is not None:
            msg = "a DATA frame started before the previous frame's payload arrived"
            raise FrameError(msg)
        mode = h.flags & (F_RING | F_IPC | F_CMA)
        if mode not in (F_RING, F_IPC, F_CMA):
            msg = f"DATA frame with flags 0x{h.flags:x}: an shm channel carries payloads only through its ring or IPC"
            raise FrameError(msg)
        table = self._read_table(h)
        lengths = np.ascontiguousarray(table["length"])
        region_ids = np.ascontiguousarray(table["region"])
        addrs = self._memory.resolve(region_ids, np.ascontiguousarray(table["offset"]), lengths)
        want_gpu = mode == F_IPC
        for rid in np.unique(region_ids).tolist():
            if (device_index(self._memory.get(int(rid)).device) is not None) != want_gpu:
                kind = "GPU" if want_gpu else "host"
                msg = f"a {kind}-memory frame names region {rid}, which is not {kind} memory on this side"
                raise FrameError(msg)
        accepted = self._accept(h)
        inc = _Incoming(h.transfer_id, h.layer, mode, h.payload_len, h.n_segments, accepted,
                        np.ascontiguousarray(addrs, dtype=np.uint64), lengths, payload_starts(lengths))
        if mode in _DIRECT:
            self._pending = inc
            self._reply("go", ok=accepted)
        elif h.payload_len == 0:
            self._complete(inc)
        else:
            self._pending = inc

    def _complete(self, inc: _Incoming) -> None:
        self._pending = None
        if inc.accepted:
            self._deliver(inc.tid, inc.layer, inc.nbytes, inc.n_segments)

    def _on_xport(self, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op == "hello":
            self._on_hello(body)
        elif op == "ring":
            self._on_ring(body)
        elif op == "chunk":
            self._on_chunk(int(body["slot"]), int(body["n"]))
        elif op == "credit":
            with self._cond:
                self._free_slots.append(int(body["slot"]))
                self._cond.notify_all()
        elif op == "go":
            with self._cond:
                self._go = bool(body.get("ok"))
                self._cond.notify_all()
        elif op == "end":
            inc = self._pending
            if inc is None or inc.mode not in _DIRECT:
                msg = "'end' without a directly written frame in progress"
                raise FrameError(msg)
            self._complete(inc)
        elif op == "ring_ok":
            with self._cond:
                self._ring_reply = body
                self._cond.notify_all()
        else:
            msg = f"unknown shm transport message {op!r}"
            raise FrameError(msg)

    def _on_hello(self, body: dict[str, Any]) -> None:
        if self._peer is not None:
            msg = "second shm handshake on one channel"
            raise FrameError(msg)
        theirs, mine = str(body.get("host")), host_identity()
        if theirs != mine:
            why = (f"peer host {theirs!r} is not this host {mine!r}: the shm transport connects processes of one "
                   "host only; use the tcp transport between hosts")
            self._reply("refuse", error=why)
            raise PeerRefused(why)
        self._peer = PeerTable.parse(body.get("regions", []), int(body.get("pid", -1)))
        try:
            regions = export_regions(self._memory)
        except TransferError as exc:
            self._reply("refuse", error=str(exc))
            raise PeerRefused(str(exc)) from exc
        self._reply("hello_ok", host=mine, pid=os.getpid(), regions=regions)

    def _on_ring(self, body: dict[str, Any]) -> None:
        if self._in_ring is not None:
            self._in_ring.close()
            self._in_ring = None
        try:
            self._in_ring = ShmRing(str(body["path"]), int(body["slots"]), int(body["slot_bytes"]), create=False)
        except TransferError as exc:
            self._reply("ring_ok", ok=False, error=str(exc))
            return
        self._reply("ring_ok", ok=True)

    def _on_chunk(self, slot: int, n: int) -> None:
        inc, ring = self._pending, self._in_ring
        if inc is None or inc.mode != F_RING or ring is None:
            msg = "ring chunk without a host-memory frame in progress"
            raise FrameError(msg)
        if not (0 <= slot < ring.slots and 0 < n <= ring.slot_bytes and inc.pos + n <= inc.nbytes):
            msg = f"ring chunk (slot {slot}, {n} bytes) does not fit the ring or the frame"
            raise FrameError(msg)
        if inc.accepted:
            p_dst, p_off, p_len = chunk_pieces(inc.addrs, inc.starts, inc.lengths, inc.pos, inc.pos + n)
            native.copy_segments(p_off + np.uint64(ring.slot_addr(slot)), p_dst, p_len, self._opts.copy_threads)
        self._reply("credit", slot=slot)
        inc.pos += n
        if inc.pos == inc.nbytes:
            self._complete(inc)

    def _refusal(self, cause: str) -> str:
        return (f"frame refused: {cause}. Both sides must run the same llumnix-kv release and name only regions "
                "announced at handshake. The connection is closed.")

    def _release(self) -> None:
        if self._in_ring is not None:
            self._in_ring.close()
            self._in_ring = None
        # A sender may still be inside a copy into the ring or a kernel launch: wait for it.
        if not self._data_lock.acquire(timeout=JOIN_S):
            self.log.warning("shm channel %s: a send did not stop within %.0f s; leaving its ring mapped",
                        self.peer_name, JOIN_S)
            return
        try:
            if self._out_ring is not None:
                self._out_ring.close()
                self._out_ring = None
            if self._gpu is not None:
                device, stream, event = self._gpu
                self._gpu = None
                cuda = native.cuda()
                cuda.set_device(device)
                cuda.stream_destroy(stream)
                cuda.event_destroy(event)
        except Exception:
            self.log.exception("shm channel %s: releasing GPU resources failed", self.peer_name)
        finally:
            self._data_lock.release()
