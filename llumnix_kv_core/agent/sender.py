"""Sending side of a KV transfer: keeps a request's blocks, pushes them to whoever pulls them.

The engine adapter tells the sender which block positions of which layers are
ready (``layer_ready`` from the forward thread: a list append, no I/O). A planner
thread turns ready units into coalesced segments once a receiver is attached and
queues them on the receiver's channels; one thread per channel does the I/O, so
layer i moves while layer i+1 computes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np

from llumnix_kv_core.agent.layers import LayerEntry
from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.agent.layers import remote_layers
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.plan import Template
from llumnix_kv_core.plan import check_tp
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.plan import tp_expected_pulls
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)

FINAL_STATES = ("acked", "failed", "cancelled", "expired")


@dataclass
class ReceiverPeer:
    """A receiving agent, known from its HELLO, with the channels it opened to us.

    ``templates[layer]`` is the compiled block template from our layout (TP rank) to its
    layout (TP rank), built and checked once at handshake.
    """

    agent_id: str
    layers: dict[str, LayerEntry]
    rank: int = 0
    tp: int = 1
    templates: dict[str, Template] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    queues: dict[int, queue.Queue[Callable[[], None] | None]] = field(default_factory=dict)


@dataclass
class Attachment:
    """One receiver (a decode TP rank) that pulled a transfer, with its own block ids and progress."""

    peer: ReceiverPeer
    dst_blocks: dict[int, list[int]]
    dst_start: dict[int, int]
    planned: int = 0  # units of the transfer already planned for this receiver
    frames: int = 0
    planned_bytes: int = 0
    done_queued: bool = False
    acked: bool = False


@dataclass
class SendTransfer:
    tid: str
    blocks: dict[int, list[int]]
    units: list[tuple[str, int, int]] = field(default_factory=list)
    layer_hi: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    sealed: bool = False
    expires: float = float("inf")
    attachments: list[Attachment] = field(default_factory=list)
    expected_pulls: int = 1  # receivers that will pull it (known from the first receiver's TP size)
    frames: int = 0
    nbytes: int = 0
    outstanding: int = 0
    generation: int = 0  # bumped when the engine preempts the request: older queued sends are void
    reading: int = 0  # sends reading the source blocks right now
    state: str = "open"
    error: str = ""
    t_attach: float = 0.0
    t_done: float = 0.0

    @property
    def peer(self) -> ReceiverPeer | None:
        """The first receiver attached (None before any pulled it)."""
        return self.attachments[0].peer if self.attachments else None


class KVSender:
    def __init__(self, layers: LayerTable, signature: dict[str, Any], timeout_s: float, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        self.layers = layers
        self.signature = signature
        self.timeout_s = timeout_s
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._lock = threading.Condition()
        self._transfers: dict[str, SendTransfer] = {}
        self._pending_pulls: dict[str, list[tuple[ReceiverPeer, dict[str, Any], float]]] = {}
        self._peers: dict[str, ReceiverPeer] = {}
        self._channel_peer: dict[int, tuple[ReceiverPeer, int]] = {}
        self._released: set[str] = set()
        self._cancelled_early: dict[str, float] = {}  # cancelled before this side opened them
        self._stopped = False
        self._ready_events: dict[str, int] = {}  # layer -> CUDA event recorded after its latest writes
        self.bytes_sent = 0
        self._planner = threading.Thread(target=self._plan_loop, name="llumnix-kv-planner", daemon=True)
        self._planner.start()

    # -- engine-facing (forward / worker thread; never blocks on I/O) -----------------------
    def open(self, tid: str, blocks: dict[int, list[int]], ready: dict[int, int] | None = None) -> None:
        """Announce (or extend with new blocks) a transfer; ``ready[group]`` block positions are computed."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                t = self._transfers[tid] = SendTransfer(tid, {g: list(b) for g, b in blocks.items()})
                if self._cancelled_early.pop(tid, None) is not None:
                    t.state, t.error = "cancelled", "the decode instance cancelled the transfer"
                for e in self.layers:
                    self._add_unit(t, e.name, 0, (ready or {}).get(e.group_id, 0))
                for peer, body, _deadline in self._pending_pulls.pop(tid, []):
                    self._attach(t, peer, body)
            else:
                for g, b in blocks.items():
                    t.blocks[g] = list(b)
                # After a preemption the recomputation starts from the prefix-cache hit, if any.
                for e in self.layers:
                    self._add_unit(t, e.name, t.layer_hi.get(e.name, 0), (ready or {}).get(e.group_id, 0))
            self._lock.notify_all()

    def layer_ready(self, tid: str, layer: str, lo: int, hi: int, ready_event: int | None = None) -> None:
        """Block positions [lo, hi) of ``layer`` are computed.

        ``ready_event``: a CUDA event recorded on the forward stream after the layer's writes (GPU
        caches). The transport makes the copy wait for it on the GPU; the caller never blocks. An
        empty range (``hi <= lo``) only replaces the layer's event.
        """
        with self._lock:
            if ready_event is not None:
                self._ready_events[layer] = ready_event
            t = self._transfers.get(tid)
            if t is not None and t.state == "open":
                self._add_unit(t, layer, lo, hi)
                self._lock.notify_all()

    def complete(self, tid: str, positions: dict[int, int], blocks: dict[int, list[int]] | None = None) -> None:
        """Every layer of group g is computed for block positions [0, positions[g]).

        ``blocks`` (optional) replaces the block lists of some groups first, e.g. the final state
        block of a Mamba group, known only once the prefill is complete.
        """
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or t.state != "open":
                return
            for g, b in (blocks or {}).items():
                t.blocks[g] = list(b)
            for e in self.layers:
                self._add_unit(t, e.name, t.layer_hi.get(e.name, 0), positions.get(e.group_id, 0))
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
            if t is None or t.state != "open":
                return
            t.generation += 1
            t.units, t.layer_hi, t.complete = [], {}, False
            for a in t.attachments:
                a.planned = 0
            while t.reading and time.monotonic() < deadline:
                self._lock.wait(timeout=deadline - time.monotonic())
            if t.reading:
                self._fail(t, "failed", "the prefill request was preempted while its blocks were being sent")

    def seal(self, tid: str, ok: bool, lease_s: float) -> None:
        """The engine finished the request; its blocks stay until released (or the lease ends)."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                self._released.add(tid)
                return
            t.sealed = True
            t.expires = time.monotonic() + lease_s
            if not ok and t.state == "open":
                self._fail(t, "cancelled", "the prefill request was aborted before its prefill completed")
            self._lock.notify_all()

    def poll_released(self) -> set[str]:
        """Transfers whose source blocks are no longer read and may be freed."""
        with self._lock:
            for t in list(self._transfers.values()):
                if t.sealed and t.state in FINAL_STATES and t.outstanding == 0:
                    self._released.add(t.tid)
                    del self._transfers[t.tid]
            out, self._released = self._released, set()
            return out

    # -- frames (transport receive threads) -------------------------------------------------
    def _check_receiver(self, body: dict[str, Any]) -> tuple[dict[str, LayerEntry], int, int, dict[str, Template]]:
        check_compatible(self.signature, body.get("signature", {}), sides=("sender", "receiver"))
        rank, size = (int(x) for x in body.get("tp", (0, 1)))
        check_tp(self.tp_size, size)
        layers = remote_layers(body.get("layers", []), self.layers)
        templates = {
            name: compile_template(self.layers[name].tensor, e.tensor, self.tp_rank, self.tp_size, rank, size)
            for name, e in layers.items()
        }
        return layers, rank, size, templates

    def on_hello(self, channel: Channel, body: dict[str, Any]) -> None:
        try:
            layers, rank, size, templates = self._check_receiver(body)
        except (IncompatiblePeerError, LayoutError) as exc:
            # Refuse, but keep the connection: the receiver cancels its transfer on it and closes.
            log.error("refusing receiver %s: %s", channel.peer_name, exc)
            channel.send_control(Kind.ERROR, bytes(16), {"error": str(exc)})
            return
        agent_id, index = str(body["agent"]), int(body.get("channel", 0))
        with self._lock:
            peer = self._peers.get(agent_id)
            if peer is None:
                peer = self._peers[agent_id] = ReceiverPeer(agent_id, layers, rank, size, templates)
            peer.channels[index] = channel
            q: queue.Queue[Callable[[], None] | None] = queue.Queue()
            peer.queues[index] = q
            self._channel_peer[id(channel)] = (peer, index)
        threading.Thread(target=self._send_loop, args=(q,), name="llumnix-kv-send", daemon=True).start()
        channel.send_control(Kind.HELLO_OK, bytes(16), {"agent": agent_id})

    def on_pull(self, channel: Channel, tid: str, body: dict[str, Any]) -> None:
        with self._lock:
            entry = self._channel_peer.get(id(channel))
            if entry is None:
                channel.send_control(Kind.ERROR, tid, {"error": "PULL before HELLO on this connection"})
                return
            peer = entry[0]
            t = self._transfers.get(tid)
            if t is None:
                self._pending_pulls.setdefault(tid, []).append((peer, body, time.monotonic() + self.timeout_s))
                return
            if t.state != "open" or any(a.peer is peer for a in t.attachments) or (
                    t.attachments and len(t.attachments) >= t.expected_pulls):
                why = f"it is {t.state}" if t.state != "open" else "another receiver already pulled it"
                channel.send_control(Kind.ERROR, tid, {"error": f"transfer {tid} cannot be pulled: {why}"})
                return
            self._attach(t, peer, body)
            self._lock.notify_all()

    def _attachment(self, t: SendTransfer, channel: Channel | None) -> Attachment | None:
        entry = self._channel_peer.get(id(channel)) if channel is not None else None
        if entry is None:
            return t.attachments[0] if len(t.attachments) == 1 else None
        return next((a for a in t.attachments if a.peer is entry[0]), None)

    def on_ack(self, tid: str, channel: Channel | None = None) -> None:
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or t.state != "open":
                return
            a = self._attachment(t, channel)
            if a is not None:
                a.acked = True
            if len(t.attachments) >= t.expected_pulls and all(x.acked for x in t.attachments):
                t.state, t.t_done = "acked", time.monotonic()
            self._lock.notify_all()

    def on_cancel(self, tid: str, channel: Channel | None = None) -> None:
        with self._lock:
            entry = self._channel_peer.get(id(channel)) if channel is not None else None
            pending = [p for p in self._pending_pulls.get(tid, []) if entry is None or p[0] is not entry[0]]
            if pending:
                self._pending_pulls[tid] = pending
            else:
                self._pending_pulls.pop(tid, None)
            t = self._transfers.get(tid)
            if t is None:
                self._cancelled_early[tid] = time.monotonic() + self.timeout_s
            elif t.state == "open":
                # Other receivers of it (other decode TP ranks) are told; the canceller knows.
                self._fail(t, "cancelled", "the decode instance cancelled the transfer",
                           skip=entry[0] if entry is not None else None)
            self._lock.notify_all()

    def on_closed(self, channel: Channel) -> None:
        with self._lock:
            entry = self._channel_peer.pop(id(channel), None)
            if entry is None:
                return
            peer, index = entry
            peer.channels.pop(index, None)
            q = peer.queues.pop(index, None)
            if q is not None:
                q.put(None)
            if not peer.channels:
                self._peers.pop(peer.agent_id, None)
                for t in self._transfers.values():
                    if t.state == "open" and any(a.peer is peer for a in t.attachments):
                        self._fail(t, "failed", "the decode instance closed its connections", skip=peer)
            self._lock.notify_all()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for p in self._peers.values():
                for q in p.queues.values():
                    q.put(None)
            self._lock.notify_all()
        self._planner.join(timeout=5)

    # -- internals (lock held) ---------------------------------------------------------------
    def _add_unit(self, t: SendTransfer, layer: str, lo: int, hi: int) -> None:
        if hi > lo:
            t.units.append((layer, lo, hi))
            t.layer_hi[layer] = max(t.layer_hi.get(layer, 0), hi)

    def _attach(self, t: SendTransfer, peer: ReceiverPeer, body: dict[str, Any]) -> None:
        if not t.attachments:
            t.expected_pulls = tp_expected_pulls(self.tp_rank, self.tp_size, peer.tp)
            t.t_attach = time.monotonic()
        t.attachments.append(Attachment(peer, {int(g): list(b) for g, b in body["blocks"].items()},
                                        {int(g): int(s) for g, s in body.get("start", {}).items()}))

    def _fail(self, t: SendTransfer, state: str, why: str, *, notify: bool = True,
              skip: ReceiverPeer | None = None) -> None:
        """Move ``t`` to a final state; tell its receivers (from each channel's send thread)."""
        t.state, t.error = state, why
        if not notify:
            return
        for a in t.attachments:
            peer = a.peer
            if peer is skip or not peer.queues:
                continue
            index = min(peer.queues)

            def tell(peer=peer, index=index) -> None:
                chan = peer.channels.get(index)
                try:
                    if chan is not None:
                        chan.send_control(Kind.ERROR, t.tid, {"error": why})
                except Exception:  # the receiver may already be gone
                    log.debug("could not tell the receiver of %s: %s", t.tid, why)

            peer.queues[index].put(tell)

    def _job_done(self, t: SendTransfer, nbytes: int, error: BaseException | None, *, read: bool = True) -> None:
        with self._lock:
            t.outstanding -= 1
            t.reading -= read
            t.nbytes += nbytes
            self.bytes_sent += nbytes
            if error is not None and t.state == "open":
                self._fail(t, "failed", f"sending to the decode instance failed: {error}")
            self._lock.notify_all()

    # -- threads ------------------------------------------------------------------------------
    def _plan_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                self._lock.wait(timeout=0.5)
                self._expire()
                work = []
                for t in self._transfers.values():
                    if t.state != "open":
                        continue
                    for a in t.attachments:
                        if not a.peer.queues:
                            continue
                        units = t.units[a.planned :]
                        a.planned = len(t.units)
                        finish = t.complete and not a.done_queued
                        if units or finish:
                            blocks = {g: list(b) for g, b in t.blocks.items()}
                            work.append((t, a, units, finish, blocks, t.generation))
            for t, a, units, finish, blocks, generation in work:
                self._queue_units(t, a, units, finish, blocks, generation)

    def _queue_units(self, t: SendTransfer, a: Attachment, units: list[tuple[str, int, int]], finish: bool,
                     blocks: dict[int, list[int]], generation: int) -> None:
        peer = a.peer
        jobs = []
        plans: dict[tuple[int, ...], Any] = {}  # layers of one geometry share a plan
        for layer, lo, hi in units:
            src = self.layers[layer]
            dst = peer.layers[layer]
            g = src.group_id
            p_blocks, d_blocks = blocks.get(g, []), a.dst_blocks.get(g, [])
            lo_, hi_ = max(lo, a.dst_start.get(g, 0)), min(hi, len(p_blocks), len(d_blocks))
            if lo_ >= hi_:
                continue
            tpl = peer.templates[layer]
            key = (id(tpl), g, lo_, hi_, src.tensor.block_stride, dst.tensor.block_stride, src.tensor.num_blocks,
                   dst.tensor.num_blocks)
            seg = plans.get(key)
            if seg is None:
                seg = plans[key] = plan_tensor(tpl, src.tensor, p_blocks[lo_:hi_], dst.tensor, d_blocks[lo_:hi_])
            if len(seg.lengths) == 0:
                continue  # this rank holds nothing this receiver needs (e.g. a replicated latent)
            src_addrs = seg.src_offsets + np.uint64(src.tensor.addr)
            regions = np.full(len(seg.lengths), dst.region_id, dtype=np.uint64)
            jobs.append((src.region_id, src_addrs, regions, seg.dst_offsets, seg.lengths, dst.region_id,
                         self._ready_events.get(layer)))
        with self._lock:
            if t.state != "open" or t.generation != generation:
                return  # planned from blocks the engine has since taken back
            chans = sorted(peer.queues)
            if not chans:
                return
            for region, src_addrs, regions, offs, lens, dst_region, event in jobs:
                index = chans[region % len(chans)]
                t.outstanding += 1
                a.frames += 1
                t.frames += 1
                a.planned_bytes += int(lens.sum())
                peer.queues[index].put(self._data_job(t, a, index, dst_region, src_addrs, regions, offs, lens,
                                                      event))
            if finish and a.planned == len(t.units):
                a.done_queued = True
                t.outstanding += 1
                peer.queues[chans[0]].put(self._done_job(t, a, chans[0]))

    def _data_job(self, t, a, index, layer, src, regions, offs, lens, event=None) -> Callable[[], None]:
        generation = t.generation

        def run() -> None:
            with self._lock:
                if t.generation != generation:  # voided by a preemption: never read those blocks
                    t.outstanding -= 1
                    a.frames -= 1
                    t.frames -= 1
                    a.planned_bytes -= int(lens.sum())
                    self._lock.notify_all()
                    return
                t.reading += 1
            chan = a.peer.channels.get(index)
            try:
                if chan is None or t.state != "open":
                    msg = "connection to the decode instance is closed"
                    raise ConnectionError(msg)
                ready = {} if event is None else {"ready_event": event}
                n = chan.send_data(t.tid, layer, src, regions, offs, lens, **ready)
            except BaseException as exc:
                self._job_done(t, 0, exc)
                return
            self._job_done(t, n, None)

        return run

    def _done_job(self, t: SendTransfer, a: Attachment, index: int) -> Callable[[], None]:
        def run() -> None:
            chan = a.peer.channels.get(index)
            try:
                if chan is None:
                    msg = "connection to the decode instance is closed"
                    raise ConnectionError(msg)
                chan.send_control(Kind.DONE, t.tid, {"frames": a.frames, "bytes": a.planned_bytes})
            except BaseException as exc:
                self._job_done(t, 0, exc, read=False)
                return
            self._job_done(t, 0, None, read=False)

        return run

    @staticmethod
    def _send_loop(q: queue.Queue[Callable[[], None] | None]) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            job()

    def _expire(self) -> None:
        now = time.monotonic()
        for t in self._transfers.values():
            if t.state != "open" or not t.sealed:
                continue
            if not t.attachments and now > t.expires:
                t.state, t.error = "expired", "no decode instance pulled it before the lease ended"
                log.warning("transfer %s expired unclaimed; freeing its blocks", t.tid)
            elif t.attachments and now > t.expires + self.timeout_s:
                self._fail(t, "failed", "the decode instance never confirmed the transfer")
        for tid, deadline in list(self._cancelled_early.items()):
            if now > deadline:
                del self._cancelled_early[tid]
        for tid, pulls in list(self._pending_pulls.items()):
            keep = []
            for peer, body, deadline in pulls:
                if now <= deadline:
                    keep.append((peer, body, deadline))
                    continue
                chan = next(iter(peer.channels.values()), None)
                if chan is not None:
                    try:
                        chan.send_control(Kind.ERROR, tid, {"error": f"the prefill instance has no transfer {tid} "
                                                            "(it expired, failed, or never reached this instance)"})
                    except Exception:
                        log.debug("could not report unknown transfer %s", tid)
            if keep:
                self._pending_pulls[tid] = keep
            else:
                del self._pending_pulls[tid]
