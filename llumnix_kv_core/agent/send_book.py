"""What the sending side tracks: transfers, the receivers attached to them, their channels.

Everything here is guarded by :attr:`SendBook.lock`, a condition the planner waits on; the
engine-facing calls, the frame callbacks, the planner and the send jobs change it only while
holding it (the methods below say where they take it themselves).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from dataclasses import field

from llumnix_kv_core.agent.layers import LayerEntry
from llumnix_kv_core.agent.pull import Pull
from llumnix_kv_core.agent.send_loop import SendLoop
from llumnix_kv_core.agent.states import SendState
from llumnix_kv_core.agent.states import move
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.plan import Template
from llumnix_kv_core.plan import tp_expected_pulls
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)

Unit = tuple[str, int, int]  # (layer, lo, hi): block positions [lo, hi) of a layer are computed
Reply = tuple[Channel, str, str]  # (channel, transfer id, why): an ERROR to send once the lock is released


@dataclass
class ReceiverPeer:
    """A receiving agent, known from its HELLO, with the channels it opened to us.

    ``templates[layer]`` is the compiled block template from our layout (TP rank) to its
    layout (TP rank), built and checked once at handshake. ``loops[i]`` sends on ``channels[i]``.
    """

    agent_id: str
    layers: dict[str, LayerEntry]
    rank: int = 0
    tp: int = 1
    templates: dict[str, Template] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    loops: dict[int, SendLoop] = field(default_factory=dict)


@dataclass
class Attachment:
    """One receiver (a decode TP rank) that pulled a transfer, with its own block ids and progress."""

    peer: ReceiverPeer
    dst_blocks: dict[int, list[int]]
    dst_start: dict[int, int]
    epoch: int = 0  # the receiver's allocation epoch, stamped on every DATA frame, the DONE and an ERROR
    planned: int = 0  # units of the transfer already planned for this receiver
    frames: int = 0
    planned_bytes: int = 0
    done_queued: bool = False
    acked: bool = False


@dataclass
class SendTransfer:
    tid: str
    blocks: dict[int, list[int]]
    units: list[Unit] = field(default_factory=list)
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
    state: SendState = SendState.OPEN
    error: str = ""
    t_attach: float = 0.0
    t_done: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.state is SendState.OPEN

    @property
    def peer(self) -> ReceiverPeer | None:
        """The first receiver attached (None before any pulled it)."""
        return self.attachments[0].peer if self.attachments else None

    def end(self, state: SendState, why: str = "") -> None:
        """Move to a final ``state`` (see :mod:`~llumnix_kv_core.agent.states`)."""
        self.state = move(self.state, state)
        self.error = why


class SendBook:
    """The sender's tables and the lock that guards them."""

    def __init__(self, timeout_s: float, tp_rank: int, tp_size: int) -> None:
        self.timeout_s = timeout_s
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.lock = threading.Condition()
        self.transfers: dict[str, SendTransfer] = {}
        self.pending_pulls: dict[str, list[tuple[ReceiverPeer, Pull, float]]] = {}  # before open()
        self.peers: dict[str, ReceiverPeer] = {}
        self.channel_peer: dict[int, tuple[ReceiverPeer, int]] = {}  # id(channel) -> (peer, channel index)
        self.released: set[str] = set()
        self.cancelled_early: dict[str, float] = {}  # cancelled before this side opened them -> forget after
        self.ready_events: dict[str, int] = {}  # layer -> CUDA event recorded after its latest writes
        self.stopped = False
        self.bytes_sent = 0

    # -- lock held -----------------------------------------------------------------------------
    def add_unit(self, t: SendTransfer, layer: str, lo: int, hi: int) -> None:
        if hi > lo:
            t.units.append((layer, lo, hi))
            t.layer_hi[layer] = max(t.layer_hi.get(layer, 0), hi)

    def attach(self, t: SendTransfer, peer: ReceiverPeer, pull: Pull) -> None:
        if not t.attachments:
            t.expected_pulls = tp_expected_pulls(self.tp_rank, self.tp_size, peer.tp)
            t.t_attach = time.monotonic()
        t.attachments.append(Attachment(peer, {g: list(b) for g, b in pull.dst_blocks.items()},
                                        dict(pull.dst_start), pull.epoch))

    def fail(self, t: SendTransfer, state: SendState, why: str, *, skip: ReceiverPeer | None = None) -> None:
        """End ``t`` in ``state``; tell its receivers but ``skip`` (from each one's first send loop)."""
        t.end(state, why)
        for a in t.attachments:
            peer = a.peer
            if peer is skip or not peer.loops:
                continue
            index = min(peer.loops)

            def tell(peer: ReceiverPeer = peer, index: int = index, epoch: int = a.epoch) -> None:
                chan = peer.channels.get(index)
                try:
                    if chan is not None:
                        chan.send_control(Kind.ERROR, t.tid, {"error": why, "epoch": epoch})
                except Exception:  # the receiver may already be gone
                    log.debug("could not tell the receiver of %s: %s", t.tid, why)

            peer.loops[index].put(tell)

    def expire(self) -> list[Reply]:
        """End what outlived its lease; forget old early cancels; refuse pulls that waited too long.

        Returns the refusals, for the caller to send once it released the lock.
        """
        now = time.monotonic()
        replies: list[Reply] = []
        for t in self.transfers.values():
            if not t.is_open or not t.sealed:
                continue
            if not t.attachments and now > t.expires:
                t.end(SendState.EXPIRED, "no decode instance pulled it before the lease ended")
                log.warning("transfer %s expired unclaimed; freeing its blocks", t.tid)
            elif t.attachments and now > t.expires + self.timeout_s:
                self.fail(t, SendState.FAILED, "the decode instance never confirmed the transfer")
        for tid, deadline in list(self.cancelled_early.items()):
            if now > deadline:
                del self.cancelled_early[tid]
        for tid, pulls in list(self.pending_pulls.items()):
            keep = []
            for peer, pull, deadline in pulls:
                if now <= deadline:
                    keep.append((peer, pull, deadline))
                    continue
                chan = next(iter(peer.channels.values()), None)
                if chan is not None:
                    replies.append((chan, tid, f"the prefill instance has no transfer {tid} "
                                               "(it expired, failed, or never reached this instance)"))
            if keep:
                self.pending_pulls[tid] = keep
            else:
                del self.pending_pulls[tid]
        return replies

    # -- lock not held ------------------------------------------------------------------------
    @staticmethod
    def send_errors(replies: list[Reply]) -> None:
        """Send ERROR frames (best effort): never while holding the lock, which the engine's calls need."""
        for chan, tid, why in replies:
            try:
                chan.send_control(Kind.ERROR, tid, {"error": why})
            except Exception:  # the receiver may already be gone
                log.debug("could not tell the receiver of %s: %s", tid, why)

    # -- takes the lock --------------------------------------------------------------------------
    def job_done(self, t: SendTransfer, nbytes: int, error: BaseException | None, *, read: bool = True) -> None:
        """A queued send of ``t`` finished (``read``: it was reading the source blocks)."""
        with self.lock:
            t.outstanding -= 1
            t.reading -= read
            t.nbytes += nbytes
            self.bytes_sent += nbytes
            if error is not None and t.is_open:
                self.fail(t, SendState.FAILED, f"sending to the decode instance failed: {error}")
            self.lock.notify_all()
