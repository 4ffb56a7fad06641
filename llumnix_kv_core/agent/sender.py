"""Sending side of a KV transfer: keeps a request's blocks, pushes them to whoever pulls them.

The engine adapter tells the sender which block positions of which layers are ready
(``layer_ready`` from the forward thread: a list append, no I/O). The
:class:`~llumnix_kv_core.agent.planner.Planner` turns ready units into coalesced segments once
a receiver is attached and queues them on the receiver's
:class:`~llumnix_kv_core.agent.send_loop.SendLoop` threads, one per channel, so layer i moves
while layer i+1 computes. What the sender tracks lives in its
:class:`~llumnix_kv_core.agent.send_book.SendBook`; states and their moves are in
:mod:`~llumnix_kv_core.agent.states`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llumnix_kv_core.agent.hello import Hello
from llumnix_kv_core.agent.hello import parse_hello
from llumnix_kv_core.agent.layers import LayerEntry
from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.agent.layers import remote_layers
from llumnix_kv_core.agent.planner import Planner
from llumnix_kv_core.agent.pull import parse_pull
from llumnix_kv_core.agent.records import RecordLog
from llumnix_kv_core.agent.records import TransferRecord
from llumnix_kv_core.agent.send_book import Attachment
from llumnix_kv_core.agent.send_book import ReceiverPeer
from llumnix_kv_core.agent.send_book import SendBook
from llumnix_kv_core.agent.send_book import SendTransfer
from llumnix_kv_core.agent.send_loop import SendLoop
from llumnix_kv_core.agent.states import SendState
from llumnix_kv_core.agent.states import is_final
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.plan import Template
from llumnix_kv_core.plan import check_tp
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)


class KVSender:
    """The sending side of one engine worker.

    Engine-facing calls (``open`` .. ``poll_released``) never wait for I/O; frame callbacks
    (``on_hello`` .. ``on_closed``) run on the transport's receive threads.
    """

    def __init__(self, layers: LayerTable, signature: dict[str, Any], timeout_s: float, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        self.layers = layers
        self.signature = signature
        self.timeout_s = timeout_s
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._book = book = SendBook(timeout_s, tp_rank, tp_size)
        self.records = RecordLog()
        self._lock = book.lock
        self._transfers = book.transfers  # the book's tables, guarded by its lock
        self._pending_pulls = book.pending_pulls
        self._planner = Planner(book, layers)

    @property
    def bytes_sent(self) -> int:
        return self._book.bytes_sent

    # -- engine-facing (forward / worker thread; never blocks on I/O) -----------------------
    def open(self, tid: str, blocks: dict[int, list[int]], ready: dict[int, int] | None = None) -> None:
        """Announce (or extend with new blocks) a transfer; ``ready[group]`` block positions are computed."""
        book = self._book
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                t = self._transfers[tid] = SendTransfer(tid, {g: list(b) for g, b in blocks.items()})
                if book.cancelled_early.pop(tid, None) is not None:
                    t.end(SendState.CANCELLED, "the decode instance cancelled the transfer")
                for e in self.layers:
                    book.add_unit(t, e.name, 0, (ready or {}).get(e.group_id, 0))
                for peer, pull, _deadline in self._pending_pulls.pop(tid, []):
                    book.attach(t, peer, pull)
            else:
                for g, b in blocks.items():
                    t.blocks[g] = list(b)
                # After a preemption the recomputation starts from the prefix-cache hit, if any.
                for e in self.layers:
                    book.add_unit(t, e.name, t.layer_hi.get(e.name, 0), (ready or {}).get(e.group_id, 0))
            self._lock.notify_all()

    def layer_ready(self, tid: str, layer: str, lo: int, hi: int, ready_event: int | None = None) -> None:
        """Block positions [lo, hi) of ``layer`` are computed.

        ``ready_event``: a CUDA event recorded on the forward stream after the layer's writes (GPU
        caches). The transport makes the copy wait for it on the GPU; the caller never blocks. An
        empty range (``hi <= lo``) only replaces the layer's event.
        """
        with self._lock:
            if ready_event is not None:
                self._book.ready_events[layer] = ready_event
            t = self._transfers.get(tid)
            if t is not None and t.is_open:
                self._book.add_unit(t, layer, lo, hi)
                self._lock.notify_all()

    def complete(self, tid: str, positions: dict[int, int], blocks: dict[int, list[int]] | None = None) -> None:
        """Every layer of group g is computed for block positions [0, positions[g]).

        ``blocks`` (optional) replaces the block lists of some groups first, e.g. the final state
        block of a Mamba group, known only once the prefill is complete.
        """
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or not t.is_open:
                return
            for g, b in (blocks or {}).items():
                t.blocks[g] = list(b)
            for e in self.layers:
                self._book.add_unit(t, e.name, t.layer_hi.get(e.name, 0), positions.get(e.group_id, 0))
            t.complete = True
            self._lock.notify_all()

    def preempt(self, tid: str, timeout_s: float) -> None:
        """The engine is about to reuse the transfer's source blocks (the request was preempted).

        Queued sends are voided, what was ready is forgotten (the recomputation marks it again,
        in new blocks), and this returns once no send reads the old blocks any more. A send still
        reading after ``timeout_s`` fails the transfer, so its receiver never takes that data.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or not t.is_open:
                return
            t.generation += 1
            t.units, t.layer_hi, t.complete = [], {}, False
            for a in t.attachments:
                a.planned = 0
            while t.reading and time.monotonic() < deadline:
                self._lock.wait(timeout=deadline - time.monotonic())
            if t.reading:
                why = "the prefill request was preempted while its blocks were being sent"
                self._book.fail(t, SendState.FAILED, why)

    def seal(self, tid: str, ok: bool, lease_s: float) -> None:
        """The engine finished the request; its blocks stay until released (or the lease ends)."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                self._book.released.add(tid)
                return
            t.sealed = True
            t.expires = time.monotonic() + lease_s
            if not ok and t.is_open:
                self._book.fail(t, SendState.CANCELLED, "the prefill request was aborted before its prefill completed")
            self._lock.notify_all()

    def poll_released(self) -> set[str]:
        """Transfers whose source blocks are no longer read and may be freed."""
        released = self._book.released
        with self._lock:
            for t in list(self._transfers.values()):
                if t.sealed and is_final(t.state) and t.outstanding == 0:
                    released.add(t.tid)
                    del self._transfers[t.tid]
                    took = (t.t_done or time.monotonic()) - t.t_attach if t.t_attach else 0.0
                    self.records.add(TransferRecord("send", t.tid, t.state.value, t.nbytes, took))
            out = set(released)
            released.clear()
            return out

    # -- frames (transport receive threads) -------------------------------------------------
    def _check_receiver(self, hello: Hello) -> tuple[dict[str, LayerEntry], dict[str, Template]]:
        check_compatible(self.signature, hello.signature, sides=("sender", "receiver"))
        check_tp(self.tp_size, hello.size)
        try:
            layers = remote_layers(hello.layers, self.layers)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            msg = f"HELLO layers are malformed: {exc!r}"
            raise FrameError(msg) from exc
        templates = {
            name: compile_template(self.layers[name].tensor, e.tensor, self.tp_rank, self.tp_size, hello.rank,
                                   hello.size)
            for name, e in layers.items()
        }
        return layers, templates

    def on_hello(self, channel: Channel, body: dict[str, Any]) -> None:
        try:
            hello = parse_hello(body)
            layers, templates = self._check_receiver(hello)
        except (FrameError, IncompatiblePeerError, LayoutError) as exc:
            # Refuse, but keep the connection: the receiver cancels its transfer on it and closes.
            log.error("refusing receiver %s: %s", channel.peer_name, exc)
            channel.send_control(Kind.ERROR, bytes(16), {"error": str(exc)})
            return
        agent_id, index = hello.agent_id, hello.channel
        book = self._book
        with self._lock:
            peer = book.peers.get(agent_id)
            if peer is None:
                peer = book.peers[agent_id] = ReceiverPeer(agent_id, layers, hello.rank, hello.size, templates)
            peer.channels[index] = channel
            old = peer.loops.get(index)
            if old is not None:  # a new HELLO on a reused channel index: its old send thread must end
                old.stop()
            peer.loops[index] = SendLoop()
            book.channel_peer[id(channel)] = (peer, index)
        channel.send_control(Kind.HELLO_OK, bytes(16), {"agent": agent_id})

    def on_pull(self, channel: Channel, tid: str, body: dict[str, Any]) -> None:
        """Attach the receiver to ``tid`` (or park the pull until the engine opens it).

        A refusal is sent after the lock is released: the engine's calls need it, and a send may wait.
        """
        with self._lock:
            entry = self._book.channel_peer.get(id(channel))
        why = self._pull(channel, tid, body, entry[0]) if entry is not None else "PULL before HELLO on this connection"
        if why:
            SendBook.send_errors([(channel, tid, why)])

    def _pull(self, channel: Channel, tid: str, body: dict[str, Any], peer: ReceiverPeer) -> str:
        """Attach or park a PULL of ``peer``; why it is refused, or "" when it is not."""
        try:
            pull = parse_pull(body, peer.layers)
        except FrameError as exc:
            log.warning("refusing a PULL of %s from %s: %s", tid, channel.peer_name, exc)
            return f"PULL of transfer {tid} refused: {exc}; the receiver must name block ids of its announced pools"
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                self._pending_pulls.setdefault(tid, []).append((peer, pull, time.monotonic() + self.timeout_s))
                return ""
            if not t.is_open or any(a.peer is peer for a in t.attachments) or (
                    t.attachments and len(t.attachments) >= t.expected_pulls):
                why = f"it is {t.state.value}" if not t.is_open else "another receiver already pulled it"
                return f"transfer {tid} cannot be pulled: {why}"
            self._book.attach(t, peer, pull)
            self._lock.notify_all()
            return ""

    def _attachment(self, t: SendTransfer, channel: Channel | None) -> Attachment | None:
        entry = self._book.channel_peer.get(id(channel)) if channel is not None else None
        if entry is None:
            return t.attachments[0] if len(t.attachments) == 1 else None
        return next((a for a in t.attachments if a.peer is entry[0]), None)

    def on_ack(self, tid: str, channel: Channel | None = None) -> None:
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or not t.is_open:
                return
            a = self._attachment(t, channel)
            if a is not None:
                a.acked = True
            if len(t.attachments) >= t.expected_pulls and all(x.acked for x in t.attachments):
                t.end(SendState.ACKED)
                t.t_done = time.monotonic()
            self._lock.notify_all()

    def on_cancel(self, tid: str, channel: Channel | None = None) -> None:
        book = self._book
        with self._lock:
            entry = book.channel_peer.get(id(channel)) if channel is not None else None
            pending = [p for p in self._pending_pulls.get(tid, []) if entry is None or p[0] is not entry[0]]
            if pending:
                self._pending_pulls[tid] = pending
            else:
                self._pending_pulls.pop(tid, None)
            t = self._transfers.get(tid)
            if t is None:
                book.cancelled_early[tid] = time.monotonic() + self.timeout_s
            elif t.is_open:
                # Other receivers of it (other decode TP ranks) are told; the canceller knows.
                book.fail(t, SendState.CANCELLED, "the decode instance cancelled the transfer",
                          skip=entry[0] if entry is not None else None)
            self._lock.notify_all()

    def on_closed(self, channel: Channel) -> None:
        book = self._book
        with self._lock:
            entry = book.channel_peer.pop(id(channel), None)
            if entry is None:
                return
            peer, index = entry
            if peer.channels.get(index) is channel:  # not yet taken over by a later HELLO
                peer.channels.pop(index, None)
                loop = peer.loops.pop(index, None)
                if loop is not None:
                    loop.stop()
            if not peer.channels:
                book.peers.pop(peer.agent_id, None)
                for t in self._transfers.values():
                    if t.is_open and any(a.peer is peer for a in t.attachments):
                        book.fail(t, SendState.FAILED, "the decode instance closed its connections", skip=peer)
            self._lock.notify_all()

    def stop(self) -> None:
        with self._lock:
            self._book.stopped = True
            for p in self._book.peers.values():
                for loop in p.loops.values():
                    loop.stop()
            self._lock.notify_all()
        self._planner.join(timeout=5)
