"""flash_attn layout parser: vLLM's standard attention pages, fused K|V per cell."""

from __future__ import annotations

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import STANDARD_BACKENDS
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core import native
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.layout import plan_blocks
from llumnix_kv_core.manager import build_registry

B, H, N, D = 10, 4, 16, 8  # blocks, kv heads, tokens per block, head size
C = 2 * D  # K then V, elements
ITEM = 2  # bfloat16
CELL = C * ITEM


def strides(layout: str, layers: int = 1) -> tuple[int, int, int, int]:
    """Byte strides of the [B, H, N, C] view of one layer for vLLM's layout names."""
    page = H * N * CELL
    if layout == "LBNHC":
        return page, CELL, H * CELL, ITEM
    if layout == "LBHNC":
        return page, N * CELL, CELL, ITEM
    if layout == "BLNHC":  # blocks outermost across layers: a block of one layer is strided by all layers
        return layers * page, CELL, H * CELL, ITEM
    raise AssertionError(layout)


def describe(layout: str = "LBNHC", *, backend: str = "FLASH_ATTN", engine: str = "vllm", kind: str = "attention",
             layers: int = 2, addr: int = 1 << 30, dtype: str = "torch.bfloat16") -> CacheGroupDescription:
    st = strides(layout, layers)
    page = H * N * CELL
    if layout.startswith("BL"):
        bases = [addr + i * page for i in range(layers)]
    else:
        bases = [addr + i * B * page for i in range(layers)]
    tensors = tuple(TensorDescription(f"model.layers.{i}.self_attn.attn", base, (B, H, N, C), st, ITEM)
                    for i, base in enumerate(bases))
    return CacheGroupDescription(engine, 1, kind, backend, layout, N, dtype, tensors,
                                 {"num_kv_heads": H, "head_size": D, "head_size_v": D})


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_accepts_flash_attn_pages(layout):
    desc = describe(layout)
    lay = FlashAttnParser().parse(desc)
    assert lay is not None
    assert (lay.parser, lay.group_id, lay.kind, lay.block_size) == ("flash_attn", 1, "attention", N)
    page = H * N * CELL
    assert [t.name for t in lay.tensors] == [t.name for t in desc.tensors]
    for t, d in zip(lay.tensors, desc.tensors):
        assert t.addr == d.addr
        assert (t.num_blocks, t.block_stride) == (B, page)
        assert (t.unit_offsets, t.unit_bytes) == ((0,), page)  # a whole page is one contiguous unit
        assert t.logical == (H, N, CELL)
        assert t.extent == B * page
    assert dict(lay.signature) == {"kind": "attention", "content": "kv-fused", "dtype": "torch.bfloat16",
                                   "block_size": N, "cache_dtype": "auto"}


def test_layer_interleaved_pages():
    lay = FlashAttnParser().parse(describe("BLNHC", layers=3))
    assert lay is not None
    page = H * N * CELL
    for t in lay.tensors:
        assert (t.block_stride, t.unit_offsets, t.unit_bytes) == (3 * page, (0,), page)
        assert t.extent == (B - 1) * 3 * page + page


@pytest.mark.parametrize("backend", sorted(STANDARD_BACKENDS))
def test_accepts_every_standard_backend(backend):
    assert FlashAttnParser().parse(describe(backend=backend)) is not None


@pytest.mark.parametrize(
    "change",
    [{"backend": "CPU_ATTN"}, {"backend": "FLASHMLA"}, {"backend": ""}, {"engine": "sglang"}, {"kind": "mla"},
     {"kind": "mamba"}],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_declines_other_groups(change):
    assert FlashAttnParser().parse(describe(**change)) is None


def test_refuses_non_contiguous_content():
    bad = TensorDescription("x", 0, (B, H, N, C), (H * N * CELL * 2, CELL * 2, H * CELL * 2, ITEM * 2), ITEM)
    desc = CacheGroupDescription("vllm", 0, "attention", "FLASH_ATTN", "LBNHC", N, "bf16", (bad,))
    with pytest.raises(LayoutError, match=r"content dim has stride"):
        FlashAttnParser().parse(desc)


def test_memory_order_is_not_part_of_the_signature_but_dtype_is():
    a = FlashAttnParser().parse(describe("LBNHC"))
    b = FlashAttnParser().parse(describe("LBHNC"))
    check_compatible(a.signature, b.signature)  # the plan compiler permutes between them
    c = FlashAttnParser().parse(describe("LBNHC", dtype="torch.float16"))
    with pytest.raises(IncompatiblePeerError, match=r"dtype: here='torch.bfloat16' peer='torch.float16'"):
        check_compatible(a.signature, c.signature)
    check_compatible(a.signature, FlashAttnParser().parse(describe("LBNHC", addr=7 << 30)).signature)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_parsed_layout_moves_cells_with_their_meaning(layout):
    """Plan + copy between two parsed caches equals ``dst[db] = src[sb]`` on the [B, H, N, C] views."""
    page = H * N * CELL
    rng = np.random.default_rng(5)
    src_pool = rng.integers(-128, 128, size=2 * B * page, dtype=np.int8)
    dst_pool = rng.integers(-128, 128, size=2 * B * page, dtype=np.int8)
    src = FlashAttnParser().parse(describe(layout, addr=src_pool.ctypes.data))
    dst = FlashAttnParser().parse(describe(layout, addr=dst_pool.ctypes.data))
    st = strides(layout)
    expected = dst_pool.copy()
    sb, db = [7, 8, 9, 0], [1, 2, 3, 9]
    for i in range(2):
        def view(pool, i=i):
            return as_strided(pool[i * B * page:], shape=(B, H, N, CELL), strides=(*st[:3], 1))
        view(expected)[db] = view(src_pool)[sb]
        plan = plan_blocks(src.tensors[i], sb, dst.tensors[i], db)
        assert len(plan.lengths) == 2  # runs 7-9 -> 1-3 and 0 -> 9
        native.copy_segments(plan.src_offsets + np.uint64(src.tensors[i].addr),
                             plan.dst_offsets + np.uint64(dst.tensors[i].addr), plan.lengths)
    np.testing.assert_array_equal(dst_pool, expected)


def test_registered_through_the_entry_point():
    reg = build_registry()
    assert reg.parse_layout(describe("LBHNC")).parser == "flash_attn"
    assert "flash_attn" in reg.providers["layout"]
