"""vLLM-0.32-shaped GPU KV caches (torch) and the process entry points of the GPU tests.

vLLM allocates the whole KV cache as one flat ``torch.int8`` tensor and hands each attention
layer over as a ``[B, H, N, C]`` view into it (C = K|V fused, elements of the model dtype);
the memory order of B/H/N is the model-wide layout: LBNHC (FLASH_ATTN's default) or LBHNC.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np

from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.manager import get_registry

LAYERS, BLOCKS, HEADS, TOKENS, HEAD_SIZE = 6, 256, 4, 16, 64
WAIT_S = 40.0


class VllmCache:
    """One int8 pool on ``device`` with per-layer ``[B, H, N, C]`` bf16 views, like vLLM 0.32 registers them."""

    def __init__(self, device: str, layout: str, seed: int, layers: int = LAYERS, blocks: int = BLOCKS) -> None:
        import torch

        self.torch = torch
        c = 2 * HEAD_SIZE  # K|V fused, bf16 elements
        self.page_elems = HEADS * TOKENS * c
        per_layer = blocks * self.page_elems * 2
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(-128, 128, (layers * per_layer,), dtype=torch.int8, generator=gen).to(device)
        as_bf16 = self.pool.view(torch.bfloat16)
        if layout == "LBNHC":
            strides = (TOKENS * HEADS * c, c, HEADS * c, 1)
        elif layout == "LBHNC":
            strides = (HEADS * TOKENS * c, TOKENS * c, c, 1)
        else:
            raise ValueError(layout)
        self.layout_name = layout
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        self.views = {
            name: torch.as_strided(as_bf16, (blocks, HEADS, TOKENS, c), strides, i * per_layer // 2)
            for i, name in enumerate(self.names)
        }
        tensors = tuple(
            tensor_layout_from_bhnc(TensorDescription(name, v.data_ptr(), tuple(v.shape),
                                                      tuple(s * 2 for s in v.stride()), 2, device))
            for name, v in self.views.items()
        )
        self.layout = KVLayout("flash_attn", 0, "attention", TOKENS, tensors,
                               {"layout": layout, "page": [HEADS, TOKENS, c * 2]})

    def signature(self) -> dict[str, Any]:
        return {"model": "toy", "dtype": "bfloat16", "groups": [dict(self.layout.signature)]}

    def blocks_of(self, name: str, ids: list[int]):
        return self.views[name][ids]


def agent(cache: VllmCache, device: str, connections: int = 2):
    from llumnix_kv_core.agent import KVAgent

    cfg = TransportConfig(connect_timeout_s=30.0, io_timeout_s=30.0, connections_per_peer=connections)
    return KVAgent(get_registry().transport("shm").factory(cfg), [cache.layout], cache.signature(),
                   timeout_s=30.0, device=device)


def wait_done(a, tid: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        done, failed = a.receiver.poll()
        if failed:
            raise AssertionError(f"transfer failed: {failed}")
        if tid in done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"transfer {tid} not done within {WAIT_S} s")
        time.sleep(0.001)


def receiver_main(q_in, q_out, layout: str, seed: int) -> None:
    """GPU1: receive transfers into a vLLM-shaped cache; answer each with a byte-exact check."""
    try:
        import torch

        torch.cuda.set_device(1)
        cache = VllmCache("cuda:1", layout, seed)
        a = agent(cache, "cuda:1")
        q_out.put(("ready",))
        while True:
            cmd = q_in.get(timeout=600)
            if cmd[0] == "stop":
                break
            _, tid, address, db, expected = cmd  # expected: {layer name: CPU int8 bytes of the new blocks}
            before = cache.pool.clone()
            a.receiver.start(tid, address, {0: db}, {0: 0})
            wait_done(a, tid)
            t_done = time.monotonic()
            torch.cuda.synchronize()
            want = before.view(torch.bfloat16).clone()
            got = cache.pool.view(torch.bfloat16)
            mismatched = []
            for name in cache.names:
                view = torch.as_strided(want, cache.views[name].shape, cache.views[name].stride(),
                                        cache.views[name].storage_offset())
                view[db] = expected[name].to("cuda:1").view(torch.bfloat16).reshape(view[db].shape)
            equal = torch.equal(want.view(torch.int8), got.view(torch.int8))
            if not equal:
                for name in cache.names:
                    v = cache.views[name]
                    w = torch.as_strided(want, v.shape, v.stride(), v.storage_offset())
                    if not torch.equal(w.view(torch.int16), v.view(torch.int16)):
                        mismatched.append(name)
            q_out.put(("checked", tid, equal, mismatched, t_done))
        a.close()
        q_out.put(("stopped",))
    except BaseException:
        q_out.put(("error", traceback.format_exc()))


def page_bytes(views, ids: list[int]) -> Any:
    """The selected blocks of one layer as CPU int8 (what the receiver must end up holding)."""
    import torch

    return views[ids].contiguous().view(torch.int8).cpu()


def random_blocks(rng: np.random.Generator, n: int, blocks: int = BLOCKS) -> list[int]:
    return rng.choice(blocks, size=n, replace=False).tolist()
