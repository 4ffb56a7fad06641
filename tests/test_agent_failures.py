"""Transfer agents (over the in-process loopback) when a transfer cannot complete: refused peers, aborts,
expired leases, unknown transfers, unreachable senders. D reports every failure; P frees its blocks."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.testing.agents import KVCache
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


def test_incompatible_signature_names_the_fields(make_agent):
    p, d = KVCache(1, PARSER), KVCache(2, PARSER)
    pa = make_agent([p.layout], p.signature(dtype="float16", tp=2), listen=True)
    da = make_agent([d.layout], d.signature(dtype="bfloat16", tp=1))
    tid = new_transfer_id()
    before = d.pool.copy()
    send_all(pa, tid, p, [0, 1])
    da.receiver.start(tid, pa.address, {0: [0, 1]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert pa.address in why
    # every differing field, with P's value then D's
    assert re.search(r"dtype: \w+='float16' \w+='bfloat16'", why), why
    assert re.search(r"tp: \w+=2 \w+=1", why), why
    assert "model:" not in why
    np.testing.assert_array_equal(d.pool, before)
    wait_released(pa, tid, timeout=5.0)  # refused: P frees the blocks now, not after the 30 s lease


def test_different_layers_are_refused(make_agent):
    p, d = KVCache(1, PARSER, layers=3), KVCache(2, PARSER, layers=4)
    sig = p.signature()
    pa = make_agent([p.layout], sig, listen=True)
    da = make_agent([d.layout], sig)
    tid = new_transfer_id()
    send_all(pa, tid, p, [0])
    da.receiver.start(tid, pa.address, {0: [5]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert "cache layers differ" in why
    assert "model.layers.3.self_attn" in why


def test_abort_on_prefill_side_fails_the_receiver(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pa.sender.open(tid, {0: [0, 1]})
    pa.sender.layer_ready(tid, p.names[0], 0, 2)
    da.receiver.start(tid, pa.address, {0: [0, 1]}, {0: 0})
    wait_for(lambda: np.array_equal(d.view(0)[[0, 1]], p.view(0)[[0, 1]]), "the first layer")
    pa.sender.seal(tid, False, 30.0)
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert "aborted" in why
    wait_released(pa, tid)


def test_lease_expiry_releases_unclaimed_transfer(pair):
    p, pa, _d, _da = pair
    tid = new_transfer_id()
    send_all(pa, tid, p, [0, 1, 2], lease_s=0.5)
    t0 = time.monotonic()
    assert pa.sender.poll_released() == set()
    wait_released(pa, tid, timeout=5.0)
    assert time.monotonic() - t0 >= 0.45


def test_pull_for_unknown_transfer_errors_after_timeout(make_agent):
    p, d = KVCache(1, PARSER), KVCache(2, PARSER)
    pa = make_agent([p.layout], p.signature(), listen=True, timeout_s=1.0)
    da = make_agent([d.layout], d.signature(), timeout_s=30.0)
    tid = new_transfer_id()
    t0 = time.monotonic()
    da.receiver.start(tid, pa.address, {0: [0]}, {0: 0})
    state, why = wait_transfer(da, tid, timeout=10.0)
    elapsed = time.monotonic() - t0
    assert state == "failed"
    assert f"has no transfer {tid}" in why
    assert 0.9 <= elapsed < 10.0  # P's timeout, not D's


def test_unreachable_sender(make_agent):
    p, d = KVCache(1, PARSER), KVCache(2, PARSER)
    gone = make_agent([p.layout], p.signature(), listen=True)
    address = gone.address
    gone.transport.close()  # nobody listens there any more
    da = make_agent([d.layout], d.signature())
    tid = new_transfer_id()
    da.receiver.start(tid, address, {0: [0]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert address in why
