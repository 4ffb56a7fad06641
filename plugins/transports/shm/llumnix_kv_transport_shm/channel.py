"""One shm channel: frames over a loopback socket, payloads through shared memory or CUDA IPC.

Frames use the core wire format. The transport's own messages are ``TRANSPORT`` frames whose
JSON body names the operation (``hello``/``hello_ok``/``refuse`` at handshake, then the data
paths' messages); they never reach the frame handler, and nothing else may precede the
handshake. A DATA frame's header flag says which data path carries its payload (see
:mod:`llumnix_kv_transport_shm.paths`):

* GPU destinations: the direct path, through CUDA IPC (``F_IPC``): the peer's exported virtual
  memory, mapped at handshake, or its legacy IPC handles (:mod:`llumnix_kv_transport_shm.export`);
* host destinations: the direct path through cross-memory attach (``F_CMA``) where the
  handshake found that this process may write the peer's memory (``host_path`` ``auto`` or
  ``cma``), else the ring (``F_RING``); frames without payload always take the ring (no fence).

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
from collections.abc import Callable
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
from llumnix_kv_transport_shm.direct import DirectPath
from llumnix_kv_transport_shm.direct import cma_unreachable
from llumnix_kv_transport_shm.export import ExportedRegions
from llumnix_kv_transport_shm.export import export_regions
from llumnix_kv_transport_shm.fd_channel import FdOffer
from llumnix_kv_transport_shm.ipc import IpcMappings
from llumnix_kv_transport_shm.ipc import PeerTable
from llumnix_kv_transport_shm.ipc import device_index
from llumnix_kv_transport_shm.ipc import local_gpu_devices
from llumnix_kv_transport_shm.local import ShmOptions
from llumnix_kv_transport_shm.local import host_identity
from llumnix_kv_transport_shm.paths import F_CMA
from llumnix_kv_transport_shm.paths import F_IPC
from llumnix_kv_transport_shm.paths import F_RING
from llumnix_kv_transport_shm.paths import DataPath
from llumnix_kv_transport_shm.paths import Incoming
from llumnix_kv_transport_shm.paths import Outgoing
from llumnix_kv_transport_shm.ring import ShmRing
from llumnix_kv_transport_shm.ring import payload_starts
from llumnix_kv_transport_shm.ring_path import RingPath
from llumnix_kv_transport_shm.vmm import VmmMappings


def _message(op: str, fields: dict[str, Any]) -> bytes:
    raw = wire.encode_body({"op": op, **fields})
    return wire.pack_header(Kind.TRANSPORT, ZERO_TID, body_len=len(raw)) + raw


class ShmChannel(StreamChannel):
    """Frames over a loopback socket; DATA payloads through the ring, cross-memory attach or CUDA IPC.

    Built from the transport's parts: its ``options``, the ``mappings`` of peer GPU memory it
    shares between channels, and ``io_timeout_s``.
    """

    transport_name = "shm"
    log = logging.getLogger(__name__)

    def __init__(
        self,
        sock: socket.socket,
        peer_name: str,
        handler: FrameHandler,
        memory: MemoryRegistry,
        options: ShmOptions,
        mappings: IpcMappings,
        io_timeout_s: float,
        on_exit: Callable[[ShmChannel], None] | None = None,
    ) -> None:
        self.data_lock = threading.Lock()  # one outgoing DATA frame at a time
        self.cond = threading.Condition()  # replies the receive thread hands to senders
        super().__init__(sock, peer_name, handler, memory, io_timeout_s, on_exit)
        self._options = options
        self._peer: PeerTable | None = None
        self._pending: Incoming | None = None  # the DATA frame being received
        self._vmm = VmmMappings()  # the peer's exported GPU memory, mapped for this channel
        self._offer: FdOffer | None = None  # our exported GPU memory, until the peer took it
        self._ring = RingPath(self, options)
        self._direct = DirectPath(self, memory, options, mappings, self._vmm)
        self._paths: dict[int, DataPath] = {F_RING: self._ring, F_CMA: self._direct, F_IPC: self._direct}
        self._routes: dict[str, DataPath] = {op: p for p in (self._ring, self._direct) for op in p.ops}
        self._host: DataPath = self._ring  # how host-memory payloads go, chosen at handshake
        self._host_refusal = ""  # why they cannot go at all (host_path "cma" the peer refuses)

    @property
    def io_timeout(self) -> float:
        return self._io_timeout

    @property
    def peer(self) -> PeerTable:
        assert self._peer is not None, "send_data before the handshake"
        return self._peer

    @property
    def _out_ring(self) -> ShmRing | None:
        """The ring this side sends host memory through; None until the first ring frame with a payload."""
        return self._ring.out_ring

    # -- handshake ---------------------------------------------------------------------------
    def handshake(self, timeout_s: float) -> None:
        """Connecting side, before ``start``: exchange host identity and region tables.

        Exported virtual GPU memory travels as file descriptors: each side offers its own on a
        descriptor socket named in its message, and the other takes them before it answers (the
        listener) or once the answer came (this side). On failure the caller releases what this
        channel mapped (:meth:`release_gpu_mappings`).
        """
        exported = export_regions(self._memory)
        offer = FdOffer(exported.fds, timeout_s) if exported.fds else None  # owns the descriptors now
        try:
            self.post("hello", host=host_identity(), pid=os.getpid(), **self._announce(exported, offer))
            self._sock.settimeout(timeout_s)
            try:
                h = wire.unpack_header(self._read_exact(wire.HEADER_SIZE))
                body = wire.decode_body(bytes(self._read_exact(h.body_len))) if h.body_len else {}
            except (PeerClosed, OSError, FrameError) as exc:
                msg = (f"shm peer {self.peer_name} did not complete the handshake within {timeout_s:g} s ({exc}); "
                       "check that an shm transport listens there")
                raise TransferError(msg) from exc
        finally:
            if offer is not None:
                offer.close()  # the listener took the descriptors before it answered
        if h.kind != Kind.TRANSPORT or body.get("op") not in ("hello_ok", "refuse"):
            msg = f"shm peer {self.peer_name} answered the handshake with {h.kind.name}: it is not an shm listener"
            raise TransferError(msg)
        if body["op"] == "refuse":
            msg = f"shm peer {self.peer_name} refused the connection: {body.get('error')}"
            raise TransferError(msg)
        peer = PeerTable.from_hello(body)
        self._vmm.import_peer(peer, local_gpu_devices(self._memory), timeout_s)
        self._met(peer)
        self._sock.settimeout(self._io_timeout)

    def _on_hello(self, body: dict[str, Any]) -> None:
        """Listening side: the peer's handshake."""
        if self._peer is not None:
            msg = "second shm handshake on one channel"
            raise FrameError(msg)
        theirs, mine = str(body.get("host")), host_identity()
        if theirs != mine:
            why = (f"peer host {theirs!r} is not this host {mine!r}: the shm transport connects processes of one "
                   "host only; use the tcp transport between hosts")
            self.reply("refuse", error=why)
            raise PeerRefused(why)
        peer = PeerTable.from_hello(body)
        try:
            self._vmm.import_peer(peer, local_gpu_devices(self._memory), self._io_timeout)
            exported = export_regions(self._memory)
        except TransferError as exc:
            self.reply("refuse", error=str(exc))
            raise PeerRefused(str(exc)) from exc
        if exported.fds:  # served to the connecting side once it has our answer; closed at the latest on exit
            self._offer = FdOffer(exported.fds, self._io_timeout, peer.pid)
        self._met(peer)
        self.reply("hello_ok", host=mine, pid=os.getpid(), **self._announce(exported, self._offer))

    @staticmethod
    def _announce(exported: ExportedRegions, offer: FdOffer | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"regions": exported.entries}
        if offer is not None:
            fields.update(allocations=exported.sizes, fd_socket=offer.name)
        return fields

    def release_gpu_mappings(self) -> None:
        """Unmap the peer's exported GPU memory and stop offering ours (a channel that will not start)."""
        if self._offer is not None:
            self._offer.close()
        self._vmm.close()

    def _met(self, peer: PeerTable) -> None:
        """The handshake is done: choose the host-memory path to this peer (probed once)."""
        self._peer = peer
        gpu_paths = peer.gpu_paths()
        if gpu_paths:
            self.log.info("shm channel %s: GPU memory through %s", self.peer_name, " and ".join(gpu_paths))
        path = self._options.host_path
        if path == "ring" or not peer.host_addresses().any():
            return
        why = cma_unreachable(peer)
        if why is None:
            self._host = self._direct
        elif path == "cma":
            self._host_refusal = f"host_path 'cma' cannot reach shm peer {self.peer_name}: {why}"
        else:
            self.log.info("shm channel %s: host memory moves through the ring: %s", self.peer_name, why)

    # -- what the data paths use (paths.Link) ------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        self._send(frame)

    def post(self, op: str, **fields: Any) -> None:
        self._send(_message(op, fields))

    def reply(self, op: str, **fields: Any) -> None:
        frame = _message(op, fields)
        with self._send_lock:
            try:
                native.send_segments(self._fd, frame, EMPTY, EMPTY, self._io_timeout)
            except OSError as exc:  # TimeoutError included
                raise PeerClosed(self._pending is not None) from exc

    def wait(self, pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._io_timeout
        with self.cond:
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
                self.cond.wait(min(left, 0.5))

    def abort(self, exc: BaseException) -> None:
        if not self.closed:
            self._fail(exc if isinstance(exc, TransferError) else TransferError(str(exc)))

    def closed_error(self) -> TransferError:
        return self._closed_error()

    def complete(self, inc: Incoming) -> None:
        self._pending = None
        if inc.accepted:
            self._deliver(inc.tid, inc.layer, inc.nbytes, inc.n_segments)

    def _shutdown(self) -> None:
        super()._shutdown()
        with self.cond:
            self.cond.notify_all()

    # -- sending DATA ------------------------------------------------------------------------
    def _send_data(self, transfer_id: str | bytes, layer: int, src: np.ndarray, regions: np.ndarray,
                   offsets: np.ndarray, lens: np.ndarray, ready_event: int | None, epoch: int) -> int:
        """Send one DATA frame through the path its destination takes; returns the payload bytes.

        ``ready_event`` (a CUDA event handle) is waited for on the GPU before a GPU copy starts;
        for host destinations it is synchronised first.
        """
        n = len(lens)
        if self.closed:
            raise self._closed_error()
        peer = self.peer
        kinds = peer.kinds_of(regions)
        if n and not kinds.all():
            rid = int(regions[np.argmin(kinds)])
            msg = (f"segment names region {rid} of the peer, which it did not announce at handshake "
                   f"(it announced {sorted(peer.entries)})")
            raise ValueError(msg)
        total = int(lens.sum(dtype=np.uint64)) if n else 0
        gpu = bool(n) and bool((kinds == 2).any())
        if gpu and not (kinds == 2).all():
            msg = "one frame mixes host and GPU destination regions; send one frame per memory kind"
            raise ValueError(msg)
        out = Outgoing(transfer_id, layer, src, regions, offsets, lens, total, gpu, ready_event if gpu else None,
                       epoch)
        if gpu:
            return self._direct.send(out)
        if ready_event is not None:
            native.cuda().event_synchronize(ready_event)
        if not total:
            return self._ring.send(out)
        if self._host_refusal:
            raise TransferError(self._host_refusal)
        return self._host.send(out)

    # -- receiving ---------------------------------------------------------------------------
    def _in_frame(self) -> bool:
        return self._pending is not None

    def _on_transport(self, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op == "hello":
            self._on_hello(body)
            return
        path = self._routes.get(str(op))
        if path is None:
            msg = f"unknown shm transport message {op!r}"
            raise FrameError(msg)
        if self._peer is None:
            msg = f"shm transport message {op!r} before the handshake: the peer is not an shm transport"
            raise FrameError(msg)
        path.on_message(str(op), body, self._pending)

    def _admit(self, h: wire.FrameHeader) -> None:
        if self._peer is None:
            msg = f"{h.kind.name} frame before the shm handshake: the peer is not an shm transport"
            raise FrameError(msg)

    def _on_data_header(self, h: wire.FrameHeader) -> None:
        if self._pending is not None:
            msg = "a DATA frame started before the previous frame's payload arrived"
            raise FrameError(msg)
        mode = h.flags & (F_RING | F_IPC | F_CMA)
        path = self._paths.get(mode)
        if path is None:
            msg = f"DATA frame with flags 0x{h.flags:x}: an shm channel carries payloads only through its ring or IPC"
            raise FrameError(msg)
        if h.flags & wire.F_DIGEST:
            msg = "DATA frame with digests: an shm channel carries none (both sides must run the shm transport)"
            raise FrameError(msg)
        table, epoch, _ = self._read_table(h)
        lengths = np.ascontiguousarray(table["length"])
        region_ids = np.ascontiguousarray(table["region"])
        addrs = self._memory.resolve(region_ids, np.ascontiguousarray(table["offset"]), lengths)
        want_gpu = mode == F_IPC
        for rid in np.unique(region_ids).tolist():
            if (device_index(self._memory.get(int(rid)).device) is not None) != want_gpu:
                kind = "GPU" if want_gpu else "host"
                msg = f"a {kind}-memory frame names region {rid}, which is not {kind} memory on this side"
                raise FrameError(msg)
        self._pending = Incoming(h.transfer_id, h.layer, mode, h.payload_len, h.n_segments, self._accept(h, epoch),
                                 np.ascontiguousarray(addrs, dtype=np.uint64), lengths, payload_starts(lengths))
        path.receive(self._pending)

    def _refusal(self, cause: str) -> str:
        return (f"frame refused: {cause}. Both sides must run the same llumnix-kv release and name only regions "
                "announced at handshake. The connection is closed.")

    def _release(self) -> None:
        if self._offer is not None:
            self._offer.close()
        for path in (self._ring, self._direct):
            path.close_receiving()
        # A sender may still be inside a copy into the ring or a kernel launch: wait for it.
        if not self.data_lock.acquire(timeout=JOIN_S):
            self.log.warning("shm channel %s: a send did not stop within %.0f s; leaving its ring mapped",
                             self.peer_name, JOIN_S)
            return
        try:
            for path in (self._ring, self._direct):
                path.close_sending()
            self._vmm.close()
        except Exception:
            self.log.exception("shm channel %s: releasing GPU resources failed", self.peer_name)
        finally:
            self.data_lock.release()
