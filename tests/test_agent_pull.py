"""Transfer agents end to end (over the in-process loopback): D pulls what P sends, whole or layer by layer.

Prefill (P) and decode (D) each own a NumPy KV cache parsed by the flash_attn parser
(:class:`~llumnix_kv_core.testing.agents.KVCache`). P sends blocks ``pb``; D receives them into
different block ids ``db``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import check_prefill_then_decode
from llumnix_kv_core.testing.agents import expected_after
from llumnix_kv_core.testing.agents import send_all
from llumnix_kv_core.testing.agents import wait_for
from llumnix_kv_core.testing.agents import wait_released
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()


@pytest.fixture
def pair(make_agent):
    """(P cache, P agent listening, D cache, D agent) with equal layouts and different contents."""
    p, d = KVCache(1, PARSER), KVCache(2, PARSER, blocks=48)
    return p, make_agent([p.layout], p.signature(), listen=True), d, make_agent([d.layout], d.signature())


@pytest.mark.parametrize("connections", [1, 2, 4])
def test_prefill_then_decode(make_agent, connections):
    check_prefill_then_decode(make_agent, PARSER, connections)


def test_two_transfers_share_the_connection(pair):
    p, pa, d, da = pair
    t1, t2 = new_transfer_id(), new_transfer_id()
    expected = expected_after(p, [0, 1], d, [10, 11])
    for i in range(len(d.names)):
        d.view(i, expected)[[20, 21, 22]] = p.view(i)[[2, 3, 4]]
    send_all(pa, t1, p, [0, 1])
    send_all(pa, t2, p, [2, 3, 4])
    da.receiver.start(t1, pa.address, {0: [10, 11]}, {0: 0})
    da.receiver.start(t2, pa.address, {0: [20, 21, 22]}, {0: 0})
    seen: dict[str, str] = {}

    def poll():
        done, failed = da.receiver.poll()
        assert not failed, failed
        seen.update(dict.fromkeys(done, "done"))
        return len(seen) == 2

    wait_for(poll, "both transfers")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, t1, t2)


def test_decode_first_then_layer_by_layer(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pb, db = [8, 9, 10, 11], [44, 45, 46, 47]
    expected = expected_after(p, pb, d, db)
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    # The PULL reaches P before P knows the transfer: it is parked until P opens it.
    wait_for(lambda: tid in pa.sender._pending_pulls, "the PULL to be parked on P")
    before = d.pool.copy()
    pa.sender.open(tid, {0: pb})
    time.sleep(0.2)
    np.testing.assert_array_equal(d.pool, before)  # open alone moves nothing
    for i, name in enumerate(p.names):
        # chunked prefill: the first half of the blocks, then the rest
        pa.sender.layer_ready(tid, name, 0, 2)
        want = expected_after(p, pb[:2], d, db[:2], layers=[i])
        wait_for(lambda i=i, want=want: np.array_equal(d.view(i), d.view(i, want)), f"layer {i} first chunk")
        np.testing.assert_array_equal(d.view(i)[db[2:]], d.view(i, before)[db[2:]])
        pa.sender.layer_ready(tid, name, 2, 4)
        wait_for(lambda i=i: np.array_equal(d.view(i)[db], p.view(i)[pb]), f"layer {i}")
        for later in range(i + 1, len(p.names)):  # nothing of layers not yet computed
            np.testing.assert_array_equal(d.view(later), d.view(later, before))
    assert da.receiver.poll() == (set(), {})  # all data is there, but P has not said it is complete
    pa.sender.complete(tid, {0: len(pb)})
    pa.sender.seal(tid, True, 30.0)
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, tid)


def test_start_position_skips_locally_cached_blocks(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pb, db = [1, 2, 3, 4, 5], [30, 31, 32, 33, 34]
    expected = expected_after(p, pb[2:], d, db[2:])  # D already holds the first two blocks
    send_all(pa, tid, p, pb)
    da.receiver.start(tid, pa.address, {0: db}, {0: 2})
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    assert da.stats().bytes_received == len(p.names) * 3 * p.page_bytes
    wait_released(pa, tid)
