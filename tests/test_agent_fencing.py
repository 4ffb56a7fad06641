"""Transfer agents (over the in-process loopback) when D or the engine takes blocks back mid-transfer:
frames still in flight must not land, and nothing more is read from reclaimed blocks."""

from __future__ import annotations

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import check_cancel_fences_memory
from llumnix_kv_core.testing.agents import expected_after
from llumnix_kv_core.testing.agents import wait_for
from llumnix_kv_core.testing.agents import wait_released
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.testing.loopback import LoopbackTransport
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()


@pytest.fixture
def pair(make_agent):
    """(P cache, P agent listening, D cache, D agent) with equal layouts and different contents."""
    p, d = KVCache(1, PARSER), KVCache(2, PARSER, blocks=48)
    return p, make_agent([p.layout], p.signature(), listen=True), d, make_agent([d.layout], d.signature())


class DeliveryHold:
    """Holds back every frame that reaches D's loopback transport: it left P, it has not reached D."""

    def __init__(self, p_agent: KVAgent, d_agent: KVAgent) -> None:
        assert p_agent.address is not None
        assert isinstance(d_agent.transport, LoopbackTransport)
        self.address = p_agent.address
        self.transport = d_agent.transport

    def hold(self) -> None:
        self.transport.pause_delivery()

    def release(self) -> None:
        self.transport.resume_delivery()

    def holds(self, payload_bytes: int) -> bool:
        return self.transport.queued_bytes >= payload_bytes


@pytest.mark.parametrize("stale_frames_arrive", ["before_report", "after_report"])
def test_cancel_fences_memory_and_releases_sender(pair, stale_frames_arrive):
    p, pa, d, da = pair
    check_cancel_fences_memory(p, pa, d, da, DeliveryHold(pa, da), stale_frames_arrive)


def test_preemption_voids_queued_sends_and_resends_from_new_blocks(pair):
    """The engine takes a request's blocks back mid-transfer: nothing more is read from them, and
    the recomputation (in other blocks) is what the receiver ends up with."""
    p, pa, d, da = pair
    tid = new_transfer_id()
    old, new, db = [1, 2, 3, 4], [20, 21, 22, 23], [40, 41, 42, 43]
    pa.sender.open(tid, {0: old})
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    wait_for(lambda: pa.sender._transfers[tid].attachments, "the PULL to attach")
    pa.sender.layer_ready(tid, p.names[0], 0, 2)  # part of layer 0 computed in the old blocks
    pa.sender.preempt(tid, timeout_s=5.0)
    p.pool[:] = np.roll(p.pool, 7)  # the engine reuses (overwrites) the freed blocks
    assert pa.sender._transfers[tid].reading == 0
    expected = expected_after(p, new, d, db)
    pa.sender.open(tid, {0: new})  # resumed: recomputed from scratch into new blocks
    for name in p.names:
        pa.sender.layer_ready(tid, name, 0, len(new))
    pa.sender.complete(tid, {0: len(new)})
    pa.sender.seal(tid, True, 30.0)
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, tid)


def test_preemption_of_unknown_or_finished_transfer_is_a_no_op(pair):
    _p, pa, _d, _da = pair
    pa.sender.preempt(new_transfer_id(), timeout_s=0.1)
