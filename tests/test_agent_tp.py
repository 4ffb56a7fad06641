"""Heterogeneous tensor parallelism through real transfer agents (over the in-process loopback transport).

Each TP rank is its own agent with its own cache (vLLM's LBNHC attention pages holding that
rank's heads of one global cache). A decode rank pulls from every prefill rank that holds
some of its heads; a prefill rank pulled by several decode ranks frees its blocks only after
all of them confirmed; with a replicated MLA latent one prefill rank sends and the others
send nothing but still free their blocks. Caches of different CPU attention ISAs are refused
at handshake, naming both.
"""

from __future__ import annotations

import numpy as np
import pytest
from llumnix_kv_layout_cpu_attn.parser import CpuAttnParser
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser
from llumnix_kv_layout_mla.parser import MlaParser
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.testing.agents import wait_released
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.testing.layouts import heads_of_rank
from llumnix_kv_core.wire import new_transfer_id

LAYERS, HEADS, TOKENS, CELL = 3, 4, 8, 32  # CELL: K|V bytes per (head, token)


class RankCache:
    def __init__(self, tp: int, rank: int, blocks: int, seed: int, *, backend: str = "FLASH_ATTN",
                 kind: str = "attention", heads: int = HEADS, extra: dict | None = None) -> None:
        self.h = max(heads // tp, 1)
        self.page = self.h * TOKENS * CELL
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=LAYERS * blocks * self.page, dtype=np.int8)
        self.blocks = blocks
        if backend == "CPU_ATTN":  # head-major
            self.strides = (self.page, TOKENS * CELL, CELL, 1)
        else:  # LBNHC
            self.strides = (self.page, CELL, self.h * CELL, 1)
        self.names = [f"model.layers.{i}.attn" for i in range(LAYERS)]
        tensors = tuple(TensorDescription(n, self.pool.ctypes.data + i * blocks * self.page,
                                          (blocks, self.h, TOKENS, CELL // 2), (*self.strides[:3], 2), 2)
                        for i, n in enumerate(self.names))
        ex = {"tp_size": tp, "total_num_kv_heads": heads, "head_size": CELL // 4, **(extra or {})}
        self.desc = CacheGroupDescription("vllm", 0, kind, backend, "LBNHC", TOKENS, "bf16", tensors, ex)
        parser = {"FLASH_ATTN": FlashAttnParser(), "CPU_MLA": MlaParser(), "CPU_ATTN": CpuAttnParser()}[backend]
        self.layout = parser.parse(self.desc)

    def view(self, layer: int, pool=None):
        pool = self.pool if pool is None else pool
        return as_strided(pool[layer * self.blocks * self.page:], shape=(self.blocks, self.h, TOKENS, CELL),
                          strides=self.strides)

    def signature(self):
        return {"protocol": 1, "model": "toy", "groups": [dict(self.layout.signature)]}


def send(agent, cache: RankCache, tid: str, pb: list[int]) -> None:
    agent.sender.open(tid, {0: pb})
    for n in cache.names:
        agent.sender.layer_ready(tid, n, 0, len(pb))
    agent.sender.complete(tid, {0: len(pb)})
    agent.sender.seal(tid, True, 30.0)


def setup(make_agent, tp_p, tp_d, heads=HEADS, backend="FLASH_ATTN", kind="attention", extra_p=None, extra_d=None):
    glob = np.random.default_rng(0).integers(-128, 128, size=(LAYERS, 8, heads, TOKENS, CELL), dtype=np.int8)
    p = [RankCache(tp_p, r, 8, 10 + r, backend=backend, kind=kind, heads=heads, extra=extra_p) for r in range(tp_p)]
    for r, c in enumerate(p):
        for i in range(LAYERS):
            c.view(i)[:] = glob[i][:, heads_of_rank(r, tp_p, heads)]
    d = [RankCache(tp_d, r, 12, 20 + r, backend=backend, kind=kind, heads=heads, extra=extra_d)
         for r in range(tp_d)]
    pa = [make_agent([c.layout], c.signature(), listen=True, tp=(r, tp_p)) for r, c in enumerate(p)]
    da = [make_agent([c.layout], c.signature(), tp=(r, tp_d)) for r, c in enumerate(d)]
    return glob, p, d, pa, da


@pytest.mark.parametrize(("tp_p", "tp_d"), [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1)])
def test_head_slices_between_tp_sizes(make_agent, tp_p, tp_d):
    glob, p, d, pa, da = setup(make_agent, tp_p, tp_d)
    pb, db = [1, 2, 3, 6], [9, 10, 0, 4]
    want = []
    for r, c in enumerate(d):
        w = c.pool.copy()
        for i in range(LAYERS):
            c.view(i, w)[db] = glob[i][pb][:, heads_of_rank(r, tp_d, HEADS)]
        want.append(w)
    tid = new_transfer_id()
    for a, c in zip(pa, p):
        send(a, c, tid, pb)
    addresses = [a.address for a in pa]
    for a in da:
        a.receiver.start(tid, addresses, {0: db}, {0: 0})
    for a in da:
        assert wait_transfer(a, tid) == ("done", "")
    for r, c in enumerate(d):
        np.testing.assert_array_equal(c.pool, want[r], err_msg=f"decode rank {r}")
    for a in pa:
        wait_released(a, tid)
    assert sum(a.stats().bytes_sent for a in pa) == sum(a.stats().bytes_received for a in da)
    assert sum(a.stats().bytes_received for a in da) == len(db) * LAYERS * HEADS * TOKENS * CELL * max(1, tp_d // HEADS)


def test_one_prefill_rank_waits_for_every_decode_rank(make_agent):
    _glob, p, _d, pa, da = setup(make_agent, 1, 2)
    tid = new_transfer_id()
    send(pa[0], p[0], tid, [0, 1])
    da[0].receiver.start(tid, [pa[0].address], {0: [2, 3]}, {0: 0})
    assert wait_transfer(da[0], tid) == ("done", "")
    import time

    time.sleep(0.3)
    assert pa[0].sender.poll_released() == set()  # the second decode rank has not pulled yet
    da[1].receiver.start(tid, [pa[0].address], {0: [2, 3]}, {0: 0})
    assert wait_transfer(da[1], tid) == ("done", "")
    wait_released(pa[0], tid)


def test_replicated_latent_is_sent_by_one_rank(make_agent):
    glob, p, d, pa, da = setup(make_agent, 2, 1, heads=1, backend="CPU_MLA", kind="mla")
    pb, db = [4, 5], [7, 8]
    want = d[0].pool.copy()
    for i in range(LAYERS):
        d[0].view(i, want)[db] = glob[i][pb]
    tid = new_transfer_id()
    for a, c in zip(pa, p):
        send(a, c, tid, pb)
    da[0].receiver.start(tid, [a.address for a in pa], {0: db}, {0: 0})
    assert wait_transfer(da[0], tid) == ("done", "")
    np.testing.assert_array_equal(d[0].pool, want)
    for a in pa:
        wait_released(a, tid)  # the rank that sent nothing frees its blocks too, without waiting for its lease
    assert [a.stats().bytes_sent for a in pa] == [len(db) * LAYERS * TOKENS * CELL, 0]


def test_different_cpu_isas_are_refused_at_handshake(make_agent):
    _glob, p, d, pa, da = setup(make_agent, 1, 1, backend="CPU_ATTN", extra_p={"isa": "amx"}, extra_d={"isa": "vec"})
    tid = new_transfer_id()
    before = d[0].pool.copy()
    send(pa[0], p[0], tid, [0])
    da[0].receiver.start(tid, [pa[0].address], {0: [0]}, {0: 0})
    state, why = wait_transfer(da[0], tid)
    assert state == "failed"
    assert "groups[0].isa: sender='amx' receiver='vec'" in why
    assert "instruction set" in why
    np.testing.assert_array_equal(d[0].pool, before)
    wait_released(pa[0], tid, timeout=5.0)


def test_unsupported_tp_pair_is_refused_naming_both(make_agent):
    _glob, p, _d, pa, _da = setup(make_agent, 2, 1)
    # a decode rank of TP 3 cannot be served by TP 2 prefill ranks
    da3 = make_agent([RankCache(1, 0, 12, 5).layout], p[0].signature(), tp=(0, 3))
    tid = new_transfer_id()
    for a, c in zip(pa, p):
        send(a, c, tid, [0])
    da3.receiver.start(tid, [a.address for a in pa], {0: [0]}, {0: 0})  # never raises into the engine
    state, why = wait_transfer(da3, tid)
    assert state == "failed"
    assert "tensor-parallel sizes prefill=2 decode=3 are not supported" in why
