"""GPU <-> pinned host offload of scattered vLLM-shaped blocks (LBNHC and LBHNC), byte-exact."""

from __future__ import annotations

import numpy as np
import pytest

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.offload import BlockOffloader
from llumnix_kv_core.offload import PinnedBuffer
from llumnix_kv_core.offload import compact_like

pytestmark = pytest.mark.gpu

B, H, N, C = 512, 8, 16, 256  # C: K|V fused, bf16 elements -> 64 KiB pages


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="the offload GPU tests build vLLM-shaped caches with torch")


def _layer(torch, layout: str):
    pool = torch.randint(-128, 128, (B * H * N * C * 2,), dtype=torch.int8, device="cuda:0")
    strides = (N * H * C, C, H * C, 1) if layout == "LBNHC" else (H * N * C, N * C, C, 1)
    view = torch.as_strided(pool.view(torch.bfloat16), (B, H, N, C), strides, 0)
    t = tensor_layout_from_bhnc(TensorDescription("layer0", view.data_ptr(), (B, H, N, C),
                                                  tuple(s * 2 for s in strides), 2, "cuda:0"))
    return pool, view, t


@pytest.mark.parametrize("method", ["kernel", "ce"])
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_store_and_load_scattered_blocks(torch, layout, method):
    pool, _view, gpu = _layer(torch, layout)
    rng = np.random.default_rng(0)
    ids = rng.choice(B, 300, replace=False).tolist()
    back = rng.choice(B, 300, replace=False).tolist()
    off = BlockOffloader(0, method)
    with PinnedBuffer(300 * gpu.page_bytes) as host:
        host_layer = compact_like(gpu, host.addr, 300)
        host.array()[:] = 0xEE
        off.store(gpu, ids, host_layer, list(range(300))).wait()
        pages = pool.view(B, -1)  # one block = one page of bytes in the layout's memory order
        want = pages[ids].cpu().numpy().reshape(-1)
        np.testing.assert_array_equal(host.array().view(np.int8), want)
        expect = pool.clone().view(B, -1)
        expect[back] = pages[ids]
        off.load(host_layer, list(range(300)), gpu, back).wait()
        assert torch.equal(pool.view(B, -1), expect)
    off.close()


def test_store_waits_for_the_event_it_is_given(torch):
    from llumnix_kv_core import native

    cuda = native.cuda()
    _pool, view, gpu = _layer(torch, "LBNHC")
    ev = cuda.event_create()
    off = BlockOffloader(0)
    with PinnedBuffer(gpu.page_bytes) as host:
        torch.cuda._sleep(50_000_000)
        view[3].fill_(1.5)
        cuda.event_record(ev, torch.cuda.current_stream().cuda_stream)
        h = off.store(gpu, [3], compact_like(gpu, host.addr, 1), [0], after=ev)
        h.wait()
        assert (host.array().view(np.uint16) == 0x3FC0).all()  # bf16 1.5: written before it was read
    cuda.event_destroy(ev)
    off.close()


def test_pageable_host_memory_is_refused(torch):
    _pool, _view, gpu = _layer(torch, "LBNHC")
    pageable = np.zeros(gpu.page_bytes * 2, np.uint8)
    off = BlockOffloader(0)
    with pytest.raises(LayoutError, match="pageable host memory"):
        off.store(gpu, [0], compact_like(gpu, pageable.ctypes.data, 2), [0])
    off.close()
