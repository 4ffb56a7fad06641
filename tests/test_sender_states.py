"""Transfer states on both sides: the one transition table, and the states real agents reach over TCP."""

from __future__ import annotations

import itertools

import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.agent.receiver import RecvTransfer
from llumnix_kv_core.agent.send_book import SendTransfer
from llumnix_kv_core.agent.states import TRANSITIONS
from llumnix_kv_core.agent.states import InvalidTransition
from llumnix_kv_core.agent.states import RecvState
from llumnix_kv_core.agent.states import SendState
from llumnix_kv_core.agent.states import is_final
from llumnix_kv_core.agent.states import move
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import send_all
from llumnix_kv_core.testing.agents import wait_for
from llumnix_kv_core.testing.agents import wait_released
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()


def _reachable(start):
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(("states", "start", "finals"), [
    (SendState, SendState.OPEN, {SendState.ACKED, SendState.FAILED, SendState.CANCELLED, SendState.EXPIRED}),
    (RecvState, RecvState.CONNECTING, {RecvState.DONE, RecvState.FAILED, RecvState.CANCELLED}),
], ids=["send", "recv"])
def test_transition_table(states, start, finals):
    assert set(TRANSITIONS) >= set(states)
    assert {s for s in states if is_final(s)} == finals
    assert _reachable(start) == set(states)  # every state is reachable, and only states of its side
    for a, b in itertools.product(states, repeat=2):
        if b in TRANSITIONS[a]:
            assert move(a, b) is b
        else:
            with pytest.raises(InvalidTransition, match=f"{a.name} cannot become {b.name}"):
                move(a, b)


def test_transfers_move_only_as_the_table_says():
    t = SendTransfer(new_transfer_id(), {0: [1]})
    assert t.is_open
    t.end(SendState.CANCELLED, "why")
    assert (t.state, t.error, t.is_open) == (SendState.CANCELLED, "why", False)
    with pytest.raises(InvalidTransition):
        t.end(SendState.ACKED)
    assert t.state is SendState.CANCELLED
    r = RecvTransfer(new_transfer_id(), ["127.0.0.1:1"], {0: [1]}, {0: 0})
    with pytest.raises(InvalidTransition, match="CONNECTING cannot become DONE"):
        r.to(RecvState.DONE)
    r.to(RecvState.PULLING)
    r.to(RecvState.DONE)
    assert not r.active
    with pytest.raises(InvalidTransition):
        r.to(RecvState.FAILED, "late")
    assert (r.state, r.error) == (RecvState.DONE, "")


@pytest.fixture
def pair(make_agent):
    p, d = KVCache(1, PARSER), KVCache(2, PARSER, blocks=48)
    return p, make_agent([p.layout], p.signature(), listen=True), d, make_agent([d.layout], d.signature())


def _send_state(agent, tid):
    with agent.sender._lock:
        t = agent.sender._transfers.get(tid)
        return None if t is None else t.state


def test_a_confirmed_transfer_is_acked_then_released(pair):
    p, pa, _, da = pair
    tid = new_transfer_id()
    send_all(pa, tid, p, [1, 2])
    assert _send_state(pa, tid) is SendState.OPEN
    da.receiver.start(tid, pa.address, {0: [3, 4]}, {0: 0})
    assert wait_transfer(da, tid) == ("done", "")
    wait_for(lambda: _send_state(pa, tid) in (SendState.ACKED, None), "the ACK")
    wait_released(pa, tid)
    # Each side keeps one record of the transfer for the engine's metrics, taken once.
    (load,) = da.take_records()
    (send,) = pa.take_records()
    assert (load.direction, load.transfer_id, load.outcome, load.ok) == ("load", tid, "done", True)
    assert (send.direction, send.transfer_id, send.outcome, send.ok) == ("send", tid, "acked", True)
    assert load.nbytes == send.nbytes == 2 * len(p.names) * p.page_bytes
    assert load.seconds > 0
    assert send.seconds > 0
    assert da.take_records() == pa.take_records() == []
    assert da.stats().transfers_received == 1


def test_an_unclaimed_transfer_expires(pair):
    p, pa, _, _ = pair
    tid = new_transfer_id()
    send_all(pa, tid, p, [1], lease_s=0.05)
    wait_for(lambda: _send_state(pa, tid) is SendState.EXPIRED, "the lease to end")
    wait_released(pa, tid)


def test_a_cancelled_transfer_cannot_be_pulled_again(pair, make_agent):
    _, pa, d, da = pair
    tid = new_transfer_id()
    pa.sender.open(tid, {0: [1, 2]})
    da.receiver.start(tid, pa.address, {0: [3, 4]}, {0: 0})
    wait_for(lambda: pa.sender._transfers[tid].attachments, "the PULL to attach")
    da.receiver.cancel(tid)
    assert wait_transfer(da, tid) == ("failed", "cancelled by the engine")
    wait_for(lambda: _send_state(pa, tid) is SendState.CANCELLED, "the CANCEL")
    other = make_agent([d.layout], d.signature())
    other.receiver.start(tid, pa.address, {0: [3, 4]}, {0: 0})
    state, why = wait_transfer(other, tid)
    assert state == "failed"
    assert f"transfer {tid} cannot be pulled: it is cancelled" in why
    pa.sender.seal(tid, True, 30.0)
    wait_released(pa, tid)


def test_an_aborted_prefill_is_cancelled(pair):
    _, pa, _, _ = pair
    tid = new_transfer_id()
    pa.sender.open(tid, {0: [1]})
    pa.sender.seal(tid, False, 30.0)
    assert _send_state(pa, tid) is SendState.CANCELLED
    wait_released(pa, tid)
