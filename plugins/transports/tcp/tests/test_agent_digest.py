"""Agents over real tcp with a byte flipped in flight (a proxy between D and P): the digest of the segment
fails the load, naming where, P is told and frees its blocks, and the connection keeps serving; without
digests the same flip lands unnoticed."""

from __future__ import annotations

import numpy as np
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import expected_after
from llumnix_kv_core.testing.agents import send_all
from llumnix_kv_core.testing.agents import wait_released
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.testing.corrupting_proxy import CorruptingProxy
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()


def caches() -> tuple[KVCache, KVCache]:
    return KVCache(1, PARSER), KVCache(2, PARSER, blocks=48)


def test_corrupted_payload_fails_the_load_names_the_block_and_releases_the_sender(make_agent):
    p, d = caches()
    pa, da = make_agent([p.layout], p.signature(), listen=True), make_agent([d.layout], d.signature())
    with CorruptingProxy(pa.address, frames=1) as proxy:
        tid, pb, db = new_transfer_id(), [1, 2, 3], [40, 41, 42]
        send_all(pa, tid, p, pb)
        da.receiver.start(tid, proxy.address, {0: db}, {0: 0})
        state, why = wait_transfer(da, tid)
        assert state == "failed"
        assert proxy.corrupted == 1
        assert "digest mismatch in segment" in why
        assert "layer 'model.layers." in why
        assert any(f"block {b}," in why for b in db), why
        wait_released(pa, tid)  # D cancelled it: P frees the blocks now, not at the end of the lease

        # Nothing more is corrupted: the next transfer over the same connections is byte-exact.
        tid2, pb2, db2 = new_transfer_id(), [5, 6], [10, 11]
        expected = expected_after(p, pb2, d, db2, base=d.pool)
        send_all(pa, tid2, p, pb2)
        da.receiver.start(tid2, proxy.address, {0: db2}, {0: 0})
        assert wait_transfer(da, tid2) == ("done", "")
        for i in range(len(d.names)):
            np.testing.assert_array_equal(d.view(i)[db2], d.view(i, expected)[db2])


def test_without_digests_the_flipped_byte_lands_unnoticed(make_agent):
    """What the digest is for: with it off on both sides the same corruption is delivered as a good load."""
    p, d = caches()
    pa = make_agent([p.layout], p.signature(), listen=True, digest=False)
    da = make_agent([d.layout], d.signature(), digest=False)
    with CorruptingProxy(pa.address, frames=1) as proxy:
        tid, pb, db = new_transfer_id(), [1, 2, 3], [40, 41, 42]
        expected = expected_after(p, pb, d, db)
        send_all(pa, tid, p, pb)
        da.receiver.start(tid, proxy.address, {0: db}, {0: 0})
        assert wait_transfer(da, tid) == ("done", "")
        assert proxy.corrupted == 1
        assert int((d.pool != expected).sum()) == 1


def test_frames_without_digests_fail_a_receiver_that_wants_them(make_agent):
    p, d = caches()
    pa = make_agent([p.layout], p.signature(), listen=True, digest=False)
    da = make_agent([d.layout], d.signature())
    tid, pb, db = new_transfer_id(), [1, 2], [3, 4]
    before = d.pool.copy()
    send_all(pa, tid, p, pb)
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert "without digests" in why
    assert "set it alike on both instances" in why
    wait_released(pa, tid)
    untouched = np.ones(len(before), bool)
    for i in range(len(d.names)):
        d.view(i, untouched.view(np.int8))[db] = 0  # bytes of the failed load's blocks may have been written
    np.testing.assert_array_equal(d.pool[untouched], before[untouched])
