"""The sender's planner: ready units of open transfers become coalesced frames on the receivers' send loops.

A thread wakes whenever the book changes (or every half second, to end what outlived its
lease). For each receiver attached to an open transfer it takes the units not planned for
that receiver yet, turns each into segments with the template compiled at handshake
(:func:`~llumnix_kv_core.plan.plan_tensor`; layers of one geometry share a plan), and queues
one DATA job per unit, spread over the receiver's channels by source region, then a DONE job
once the transfer is complete. Jobs planned before a preemption never read the old blocks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.agent.send_book import Attachment
from llumnix_kv_core.agent.send_book import SendBook
from llumnix_kv_core.agent.send_book import SendTransfer
from llumnix_kv_core.agent.send_book import Unit
from llumnix_kv_core.agent.send_loop import Job
from llumnix_kv_core.agent.states import SendState
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.wire import Kind

_TICK_S = 0.5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Frame:
    """One planned DATA frame: a layer's segments for one receiver."""

    src_region: int
    src_addrs: np.ndarray
    regions: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    layer: int  # the destination region id, sent as the frame's layer
    ready_event: int | None


@dataclass(frozen=True)
class _Work:
    """What one pass found for one receiver of one transfer (copied under the lock)."""

    t: SendTransfer
    a: Attachment
    units: list[Unit]
    finish: bool
    blocks: dict[int, list[int]]
    generation: int


class Planner:
    """The planning thread of one sender."""

    def __init__(self, book: SendBook, layers: LayerTable) -> None:
        self._book = book
        self._layers = layers
        self._thread = threading.Thread(target=self._loop, name="llumnix-kv-planner", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        book = self._book
        while True:
            with book.lock:
                if book.stopped:
                    return
                book.lock.wait(timeout=_TICK_S)
                refusals = book.expire()
                work = self._collect()
            book.send_errors(refusals)
            for w in work:
                try:
                    frames = self._plan(w)
                except Exception as exc:  # one bad transfer must not stop planning for all others
                    log.exception("planning transfer %s failed", w.t.tid)
                    with book.lock:
                        if w.t.is_open:
                            book.fail(w.t, SendState.FAILED, f"the prefill instance could not plan the transfer: {exc}")
                    continue
                self._queue(w, frames)

    def _collect(self) -> list[_Work]:
        """Units not yet planned, per receiver of each open transfer (lock held)."""
        work = []
        for t in self._book.transfers.values():
            if not t.is_open:
                continue
            for a in t.attachments:
                if not a.peer.loops:
                    continue
                units = t.units[a.planned :]
                a.planned = len(t.units)
                finish = t.complete and not a.done_queued
                if units or finish:
                    work.append(_Work(t, a, units, finish, {g: list(b) for g, b in t.blocks.items()}, t.generation))
        return work

    def _plan(self, w: _Work) -> list[_Frame]:
        """The frames of ``w``'s units (lock not held: planning may take a while)."""
        peer = w.a.peer
        frames = []
        plans: dict[tuple[int, ...], Any] = {}  # layers of one geometry share a plan
        for layer, lo, hi in w.units:
            src = self._layers[layer]
            dst = peer.layers[layer]
            g = src.group_id
            p_blocks, d_blocks = w.blocks.get(g, []), w.a.dst_blocks.get(g, [])
            lo_, hi_ = max(lo, w.a.dst_start.get(g, 0)), min(hi, len(p_blocks), len(d_blocks))
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
            frames.append(_Frame(src.region_id, seg.src_offsets + np.uint64(src.tensor.addr),
                                 np.full(len(seg.lengths), dst.region_id, dtype=np.uint64), seg.dst_offsets,
                                 seg.lengths, dst.region_id, self._book.ready_events.get(layer)))
        return frames

    def _queue(self, w: _Work, frames: list[_Frame]) -> None:
        t, a, book = w.t, w.a, self._book
        peer = a.peer
        with book.lock:
            if not t.is_open or t.generation != w.generation:
                return  # planned from blocks the engine has since taken back
            chans = sorted(peer.loops)
            if not chans:
                return
            for f in frames:
                index = chans[f.src_region % len(chans)]
                t.outstanding += 1
                a.frames += 1
                t.frames += 1
                a.planned_bytes += int(f.lengths.sum())
                peer.loops[index].put(self._data_job(t, a, index, f))
            if w.finish and a.planned == len(t.units):
                a.done_queued = True
                t.outstanding += 1
                peer.loops[chans[0]].put(self._done_job(t, a, chans[0]))

    # -- jobs (run on a send loop) ---------------------------------------------------------------
    def _data_job(self, t: SendTransfer, a: Attachment, index: int, f: _Frame) -> Job:
        book = self._book
        generation = t.generation

        def run() -> None:
            with book.lock:
                if t.generation != generation:  # voided by a preemption: never read those blocks
                    t.outstanding -= 1
                    a.frames -= 1
                    t.frames -= 1
                    a.planned_bytes -= int(f.lengths.sum())
                    book.lock.notify_all()
                    return
                t.reading += 1
            chan = a.peer.channels.get(index)
            try:
                if chan is None or not t.is_open:
                    msg = "connection to the decode instance is closed"
                    raise ConnectionError(msg)
                ready = {} if f.ready_event is None else {"ready_event": f.ready_event}
                n = chan.send_data(t.tid, f.layer, f.src_addrs, f.regions, f.offsets, f.lengths, **ready,
                                   epoch=a.epoch)
            except BaseException as exc:
                book.job_done(t, 0, exc)
                return
            book.job_done(t, n, None)

        return run

    def _done_job(self, t: SendTransfer, a: Attachment, index: int) -> Job:
        book = self._book

        def run() -> None:
            chan = a.peer.channels.get(index)
            try:
                if chan is None:
                    msg = "connection to the decode instance is closed"
                    raise ConnectionError(msg)
                chan.send_control(Kind.DONE, t.tid, {"frames": a.frames, "bytes": a.planned_bytes, "epoch": a.epoch})
            except BaseException as exc:
                book.job_done(t, 0, exc, read=False)
                return
            book.job_done(t, 0, None, read=False)

        return run
