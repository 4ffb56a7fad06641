"""The offload module where no GPU is usable: clear errors, and the host layout it derives."""

from __future__ import annotations

import pytest

from llumnix_kv_core import native
from llumnix_kv_core.errors import NativeUnavailableError
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import plan_blocks
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.offload import BlockOffloader
from llumnix_kv_core.offload import compact_like


def _gpu_like_layer(layout: str):
    b, h, n, c = 64, 4, 16, 128
    strides = (n * h * c * 2, c * 2, h * c * 2, 2) if layout == "LBNHC" else (h * n * c * 2, n * c * 2, c * 2, 2)
    return tensor_layout_from_bhnc(TensorDescription("l0", 1 << 40, (b, h, n, c), strides, 2, "cuda:0"))


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_compact_host_layout_keeps_the_geometry_and_packs_blocks(layout):
    gpu = _gpu_like_layer(layout)
    host = compact_like(gpu, 4096, 10)
    assert host.geometry() == gpu.geometry()
    assert host.block_stride == gpu.page_bytes
    assert host.extent == 10 * gpu.page_bytes
    plan = plan_blocks(gpu, [5, 9, 2], host, [0, 1, 2])
    assert plan.nbytes == 3 * gpu.page_bytes
    assert plan.dst_offsets.tolist()[0] == 0


def test_offloader_without_a_gpu_names_the_cause():
    if native.has("cuda"):
        pytest.skip("a GPU is usable here")
    with pytest.raises(NativeUnavailableError, match=r"CUDA|cuda"):
        BlockOffloader(0)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="kernel, ce"):
        BlockOffloader(0, "dma")
