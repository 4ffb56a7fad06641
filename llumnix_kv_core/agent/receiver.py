"""Receiving side of a KV transfer: pulls a transfer from its sender and tracks it to completion.

Connections are opened (and the handshake done) on a background thread, never on
the engine's forward thread. Data lands directly in registered memory; a transfer
that is cancelled or failed is fenced (late frames are dropped, not written) and
is reported only once no receive thread is still writing into its blocks. Each
``start`` gets a new allocation epoch, sent in the PULL: only DATA and DONE frames
stamped with it count, so frames of an earlier allocation under the same transfer id
(blocks since released, perhaps reallocated) never land. A frame whose payload fails
its check (a digest mismatch) fails the transfer before it is acknowledged. States and their
moves are in :mod:`~llumnix_kv_core.agent.states`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.agent.records import BusyTime
from llumnix_kv_core.agent.records import RecordLog
from llumnix_kv_core.agent.records import TransferRecord
from llumnix_kv_core.agent.send_loop import SendLoop
from llumnix_kv_core.agent.states import RecvState
from llumnix_kv_core.agent.states import is_final
from llumnix_kv_core.agent.states import move
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.plan import tp_sources
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)


@dataclass
class SenderLink:
    """Our connections to one sender address, after a successful handshake."""

    address: str
    peer: Peer | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    acks: int = 0
    error: str = ""


@dataclass
class RecvTransfer:
    """One transfer into this rank; it is pulled from every source in ``sources`` (prefill TP ranks)."""

    tid: str
    sources: list[str]
    blocks: dict[int, list[int]]
    start: dict[int, int]
    state: RecvState = RecvState.CONNECTING
    error: str = ""
    epoch: int = 0  # this allocation's number: frames stamped with another one are not written
    frames: int = 0
    nbytes: int = 0
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> its DONE totals
    pulled: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.monotonic)
    t_first: float = 0.0  # first payload byte in place
    t_done: float = 0.0
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def active(self) -> bool:
        """Still connecting or pulling."""
        return not is_final(self.state)

    def to(self, state: RecvState, error: str | None = None) -> None:
        """Move to ``state`` (see :mod:`~llumnix_kv_core.agent.states`); ``error`` says why, if given."""
        self.state = move(self.state, state)
        if error is not None:
            self.error = error


def _same_epoch(body: dict[str, Any], t: RecvTransfer) -> bool:
    """Whether a control frame's body names ``t``'s allocation epoch."""
    epoch = body.get("epoch")
    return type(epoch) is int and epoch == t.epoch


class KVReceiver:
    def __init__(
        self,
        layers: LayerTable,
        signature: dict[str, Any],
        timeout_s: float,
        connect: Callable[[str], Peer],
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.layers = layers
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.signature = signature
        self.timeout_s = timeout_s
        self.agent_id = uuid.uuid4().hex
        self._connect = connect
        self._lock = threading.Condition()
        self._transfers: dict[str, RecvTransfer] = {}
        self._links: dict[str, SenderLink] = {}
        self._channel_link: dict[int, SenderLink] = {}
        self._inflight: dict[int, str] = {}  # receive-thread ident -> transfer being written
        self._epochs = itertools.count(1)
        self._jobs: queue.Queue[RecvTransfer | None] = queue.Queue()
        self._notices = SendLoop("llumnix-kv-notify")  # ACK and CANCEL frames, one thread for all transfers
        self._stopped = False
        self.bytes_received = 0
        self.busy = BusyTime()  # when data of a completed transfer was flowing in
        self.records = RecordLog()
        self._threads = [
            threading.Thread(target=self._pull_loop, name="llumnix-kv-pull", daemon=True),
            threading.Thread(target=self._watch_loop, name="llumnix-kv-watch", daemon=True),
        ]
        for th in self._threads:
            th.start()

    # -- engine-facing -----------------------------------------------------------------------
    def start(self, tid: str, address: str | Sequence[str], blocks: dict[int, list[int]],
              start: dict[int, int]) -> None:
        """Pull ``tid`` into ``blocks`` from position ``start[group]`` on.

        ``address`` is the sender's address, or the list of every prefill TP rank's address
        (rank order): this rank pulls from those :func:`~llumnix_kv_core.plan.tp_sources` names.
        """
        addresses = [address] if isinstance(address, str) else list(address)
        try:
            sources = [addresses[p] for p in tp_sources(self.tp_rank, self.tp_size, len(addresses))]
            refused = ""
        except IncompatiblePeerError as exc:  # reported through poll(), like any failed load
            sources, refused = [], str(exc)
        t = RecvTransfer(tid, sources, blocks, start)
        if refused:
            t.to(RecvState.FAILED, refused)
        with self._lock:
            if tid in self._transfers:
                msg = f"transfer {tid} is already being received"
                raise TransferError(msg)
            t.epoch = next(self._epochs)
            self._transfers[tid] = t
        if not refused:
            self._jobs.put(t)

    def cancel(self, tid: str) -> None:
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or not t.active:
                return
            t.to(RecvState.CANCELLED, "cancelled by the engine")
            self._cancel_sources(t)

    def poll(self) -> tuple[set[str], dict[str, str]]:
        """(transfers fully received, transfers failed or cancelled -> why); each reported once."""
        done: set[str] = set()
        failed: dict[str, str] = {}
        with self._lock:
            writing = self._live_inflight()
            for tid, t in list(self._transfers.items()):
                if t.state is RecvState.DONE:
                    done.add(tid)
                elif t.state in (RecvState.FAILED, RecvState.CANCELLED) and tid not in writing:
                    failed[tid] = t.error
                else:
                    continue
                del self._transfers[tid]
                end = t.t_done or time.monotonic()
                self.records.add(TransferRecord("load", tid, t.state.value, t.nbytes, end - t.t_start))
        return done, failed

    # -- frames --------------------------------------------------------------------------------
    def accept_data(self, tid: str, epoch: int) -> bool:
        """Whether a DATA frame of ``tid`` stamped ``epoch`` may be written: the transfer is being pulled into
        the blocks of that allocation."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or t.state is not RecvState.PULLING or epoch != t.epoch:
                return False
            self._inflight[threading.get_ident()] = tid
            return True

    def on_data(self, tid: str, nbytes: int) -> None:
        with self._lock:
            self._inflight.pop(threading.get_ident(), None)
            self.bytes_received += nbytes
            t = self._transfers.get(tid)
            if t is None or t.state is not RecvState.PULLING:
                return
            t.frames += 1
            t.nbytes += nbytes
            t.last_progress = time.monotonic()
            t.t_first = t.t_first or t.last_progress
            self._check_done(t)

    def on_data_failed(self, tid: str, why: str) -> None:
        """A frame of ``tid`` was written but failed its check: the transfer fails (its sources are told)."""
        with self._lock:
            self._inflight.pop(threading.get_ident(), None)
            t = self._transfers.get(tid)
            if t is not None and t.state is RecvState.PULLING:
                t.to(RecvState.FAILED, why)
                self._cancel_sources(t)

    def on_done(self, tid: str, body: dict[str, Any], channel: Channel | None = None) -> None:
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or t.state is not RecvState.PULLING or not _same_epoch(body, t):
                return
            link = self._channel_link.get(id(channel)) if channel is not None else None
            source = link.address if link is not None else t.sources[0]
            t.expected[source] = (int(body.get("frames", -1)), int(body.get("bytes", -1)))
            t.last_progress = time.monotonic()
            self._check_done(t)

    def on_hello_ok(self, channel: Channel) -> None:
        with self._lock:
            link = self._channel_link.get(id(channel))
            if link is not None:
                link.acks += 1
                self._lock.notify_all()

    def on_error(self, channel: Channel, tid: str | None, body: dict[str, Any]) -> None:
        why = str(body.get("error", "unspecified error"))
        with self._lock:
            link = self._channel_link.get(id(channel))
            if tid is None:
                if link is not None:
                    link.error = why
                    self._fail_link(link, f"the prefill instance at {link.address} refused: {why}")
                self._lock.notify_all()
                return
            t = self._transfers.get(tid)
            if t is not None and t.active and ("epoch" not in body or _same_epoch(body, t)):
                t.to(RecvState.FAILED, f"the prefill instance reported: {why}")
                self._cancel_sources(t, skip=link.address if link is not None else None)

    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        with self._lock:
            self._inflight.pop(threading.get_ident(), None)
            link = self._channel_link.pop(id(channel), None)
            if link is None:
                return
            if self._links.get(link.address) is link:
                del self._links[link.address]
            why = f"connection to the prefill instance at {link.address} closed"
            self._fail_link(link, f"{why}: {error}" if error else why)
            self._lock.notify_all()
        if link.peer is not None:  # not from this receive thread: close() joins it
            threading.Thread(target=link.peer.close, daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            links = list(self._links.values())
            self._lock.notify_all()
        self._jobs.put(None)
        self._notices.stop()
        for link in links:
            if link.peer is not None:
                link.peer.close()

    # -- internals (lock held unless noted) ------------------------------------------------------
    def _check_done(self, t: RecvTransfer) -> None:
        if len(t.expected) < len(t.sources):
            return
        want = (sum(f for f, _ in t.expected.values()), sum(b for _, b in t.expected.values()))
        if t.frames < want[0]:
            return
        if (t.frames, t.nbytes) != want:
            t.to(RecvState.FAILED, f"received {t.frames} frames / {t.nbytes} bytes, the sender announced {want}")
            self._cancel_sources(t)
            return
        t.to(RecvState.DONE)
        t.t_done = time.monotonic()
        self.busy.add(t.t_first or t.t_done, t.t_done)
        for address in t.sources:
            link = self._links.get(address)
            if link is not None and link.peer is not None:
                self._notify(link.peer.channels[0], Kind.ACK, t.tid)

    def _cancel_sources(self, t: RecvTransfer, skip: str | None = None) -> None:
        """Tell every source already pulled (but ``skip``) that this rank gave the transfer up."""
        for address in t.pulled:
            link = self._links.get(address)
            if address == skip or link is None or link.peer is None:
                continue
            self._notify(link.peer.channels[0], Kind.CANCEL, t.tid)

    def _notify(self, chan: Channel, kind: Kind, tid: str) -> None:
        """Queue a body-less ``kind`` frame to a source; the notice thread sends it (best effort)."""

        def send() -> None:
            try:
                chan.send_control(kind, tid)
            except Exception as exc:
                log.warning("could not send %s for %s: %s", kind.name, tid, exc)

        self._notices.put(send)

    def _fail_link(self, link: SenderLink, why: str) -> None:
        for t in self._transfers.values():
            if link.address in t.sources and t.active:
                t.to(RecvState.FAILED, why)
                self._cancel_sources(t, skip=link.address)

    def _live_inflight(self) -> set[str]:
        alive = {th.ident for th in threading.enumerate()}
        return {tid for ident, tid in self._inflight.items() if ident in alive}

    def _link(self, address: str, tid: str) -> SenderLink:
        """Connected and handshaken link to ``address`` (called on the pull thread).

        If the sender refuses the handshake, transfer ``tid`` is cancelled there before the
        connection closes, so the sender frees its blocks now rather than at the end of its lease.
        """
        with self._lock:
            link = self._links.get(address)
            if link is not None:
                return link
            link = self._links[address] = SenderLink(address)
        try:
            peer = self._connect(address)
        except Exception:
            with self._lock:
                self._links.pop(address, None)
            raise
        with self._lock:
            link.peer = peer
            for ch in peer.channels:
                self._channel_link[id(ch)] = link
        hello = {"agent": self.agent_id, "signature": self.signature, "layers": self.layers.describe(),
                 "tp": [self.tp_rank, self.tp_size]}
        for i, ch in enumerate(peer.channels):
            ch.send_control(Kind.HELLO, bytes(16), {**hello, "channel": i})
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            while link.acks < len(peer.channels) and not link.error and self._links.get(address) is link:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(timeout=left)
            ok = link.acks == len(peer.channels) and not link.error
            if not ok:
                self._links.pop(address, None)
        if not ok:
            if link.error:
                try:
                    peer.channels[0].send_control(Kind.CANCEL, tid)
                except Exception:
                    log.debug("could not cancel %s at %s", tid, address)
            peer.close()
            why = link.error or f"no handshake answer from {address} within {self.timeout_s:.0f} s"
            msg = f"handshake with the prefill instance at {address} failed: {why}"
            raise TransferError(msg)
        return link

    def _pull_loop(self) -> None:
        while True:
            t = self._jobs.get()
            if t is None:
                return
            body = {"blocks": {str(g): b for g, b in t.blocks.items()},
                    "start": {str(g): s for g, s in t.start.items()}, "epoch": t.epoch}
            for address in t.sources:
                try:
                    link = self._link(address, t.tid)
                    with self._lock:
                        if not t.active:
                            break
                        if t.state is RecvState.CONNECTING:
                            t.to(RecvState.PULLING)
                        t.last_progress = time.monotonic()
                        t.pulled.append(address)
                    assert link.peer is not None
                    link.peer.channels[0].send_control(Kind.PULL, t.tid, body)
                except Exception as exc:
                    log.error("transfer %s from %s failed: %s", t.tid, address, exc)
                    with self._lock:
                        if t.active:
                            t.to(RecvState.FAILED, str(exc))
                            self._cancel_sources(t, skip=address)
                    break

    def _watch_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                self._lock.wait(timeout=0.5)
                now = time.monotonic()
                for t in self._transfers.values():
                    if t.state is RecvState.PULLING and now - t.last_progress > self.timeout_s:
                        t.to(RecvState.FAILED, f"no data from the prefill instance at {', '.join(t.sources)} for "
                                               f"{self.timeout_s:.0f} s "
                                               "(raise transfer_timeout_s if prefills are this long)")
