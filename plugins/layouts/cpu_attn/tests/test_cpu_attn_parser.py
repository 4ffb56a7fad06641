"""cpu_attn layout parser: ISA-packed CPU_ATTN pages moved as opaque (block, head) units."""

from __future__ import annotations

import numpy as np
import pytest
from llumnix_kv_layout_cpu_attn.parser import CpuAttnParser

from llumnix_kv_core import native
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.layout import plan_blocks
from llumnix_kv_core.manager import build_registry

B, H, N, D = 12, 4, 32, 16  # blocks, kv heads, tokens per block, head size
C = 2 * D  # the registered tensor is [B, H, N, 2*D]
ITEM = 2
CELL = C * ITEM
PAGE = H * N * CELL


def describe(*, isa: str | None = "vec16", head_major: bool = True, backend: str = "CPU_ATTN", engine: str = "vllm",
             heads: int = H, addr: int = 1 << 30, layers: int = 2, block_pad: int = 0) -> CacheGroupDescription:
    page = heads * N * CELL
    sb = page + block_pad
    if head_major:  # LBHNC
        st = (sb, N * CELL, CELL, ITEM)
    else:  # LBNHC
        st = (sb, CELL, heads * CELL, ITEM)
    tensors = tuple(TensorDescription(f"model.layers.{i}.self_attn.attn", addr + i * B * sb, (B, heads, N, C), st,
                                      ITEM) for i in range(layers))
    extra = {"num_kv_heads": heads, "head_size": D}
    if isa is not None:
        extra["isa"] = isa
    return CacheGroupDescription(engine, 0, "attention", backend, "LBHNC" if head_major else "LBNHC", N,
                                 "torch.bfloat16", tensors, extra)


def test_emits_one_unit_per_head():
    lay = CpuAttnParser().parse(describe())
    assert lay is not None
    assert (lay.parser, lay.kind, lay.block_size) == ("cpu_attn", "attention", N)
    for t in lay.tensors:
        assert t.unit_offsets == tuple(h * N * CELL for h in range(H))
        assert t.unit_bytes == N * CELL
        assert (t.num_blocks, t.block_stride, t.logical) == (B, PAGE, (H, N, CELL))
        assert t.extent == B * PAGE
    assert dict(lay.signature) == {"kind": "attention", "content": "cpu-packed", "isa": "vec16",
                                   "dtype": "torch.bfloat16", "block_size": N, "head_size": D}
    (region,) = lay.tensors[0].regions  # one opaque tile per head, heads split over TP
    assert (region.name, [d.name for d in region.dims], region.shard.groups) == ("packed", ["H", "X"], (H,))


def test_padded_blocks():
    lay = CpuAttnParser().parse(describe(block_pad=64))
    t = lay.tensors[0]
    assert t.block_stride == PAGE + 64
    assert t.extent == (B - 1) * (PAGE + 64) + PAGE


@pytest.mark.parametrize("isa", [None, ""])
def test_requires_isa(isa):
    with pytest.raises(LayoutError, match=r"lacks the attention ISA"):
        CpuAttnParser().parse(describe(isa=isa))


def test_requires_head_major_pages():
    with pytest.raises(LayoutError, match=r"not head-major \(LBHNC\)"):
        CpuAttnParser().parse(describe(head_major=False))
    # with a single head both orders are the same bytes
    assert CpuAttnParser().parse(describe(head_major=False, heads=1)) is not None


@pytest.mark.parametrize(("change"), [{"backend": "FLASH_ATTN"}, {"backend": "TRITON_ATTN"}, {"engine": "sglang"}])
def test_declines_other_groups(change):
    assert CpuAttnParser().parse(describe(**change)) is None


def test_different_isas_are_incompatible():
    amx = CpuAttnParser().parse(describe(isa="amx"))
    vec = CpuAttnParser().parse(describe(isa="vec"))
    with pytest.raises(IncompatiblePeerError, match=r"isa: here='amx' peer='vec'.*packed for the CPU's instruction"):
        check_compatible(amx.signature, vec.signature)
    check_compatible(amx.signature, CpuAttnParser().parse(describe(isa="amx", addr=5 << 30)).signature)


def test_units_move_whole_block_heads():
    """A (block, head) unit is opaque: the plan moves it whole, at its place in the block."""
    rng = np.random.default_rng(9)
    pad = 32
    src_pool = rng.integers(-128, 128, size=2 * B * (PAGE + pad), dtype=np.int8)
    dst_pool = rng.integers(-128, 128, size=2 * B * PAGE, dtype=np.int8)
    src = CpuAttnParser().parse(describe(addr=src_pool.ctypes.data, block_pad=pad))
    dst = CpuAttnParser().parse(describe(addr=dst_pool.ctypes.data))
    expected = dst_pool.copy()
    sb, db = [3, 11, 4], [0, 5, 6]
    for i in range(2):
        s_page = src_pool[i * B * (PAGE + pad):(i + 1) * B * (PAGE + pad)].reshape(B, PAGE + pad)[:, :PAGE]
        d_page = expected[i * B * PAGE:(i + 1) * B * PAGE].reshape(B, PAGE)
        d_page[db] = s_page[sb]
        plan = plan_blocks(src.tensors[i], sb, dst.tensors[i], db)
        assert len(plan.lengths) <= len(sb) * H
        assert set(plan.lengths.tolist()) <= {k * N * CELL for k in range(1, 2 * H + 1)}
        native.copy_segments(plan.src_offsets + np.uint64(src.tensors[i].addr),
                             plan.dst_offsets + np.uint64(dst.tensors[i].addr), plan.lengths)
    np.testing.assert_array_equal(dst_pool, expected)


def test_registered_through_the_entry_point():
    reg = build_registry()
    assert reg.parse_layout(describe()).parser == "cpu_attn"
    with pytest.raises(LayoutError, match=r"lacks the attention ISA"):
        reg.parse_layout(describe(isa=None))
