"""flashinfer layout parser without vLLM: NHD / HND pages over NumPy pools, byte-exact across TP pairs.

vLLM's FLASHINFER backend registers ``[B, H, N, 2*D]`` views (K|V fused per cell) in LBNHC
("NHD": tokens outer) or LBHNC ("HND": heads outer); NVFP4 caches have two head slots per KV
head (K slots then V slots). SGLang's HND pool keeps ``[pages, H, page_size, D]`` K and V
tensors per layer. The reference is NumPy indexing by (block, head, token).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from llumnix_kv_layout_flashinfer.parser import VLLM_BACKENDS
from llumnix_kv_layout_flashinfer.parser import FlashInferParser
from llumnix_kv_layout_flashinfer.parser import flashinfer_order
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.testing.layouts import copy_by_rank_pair

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, N, D, ITEM = 4, 16, 8, 2  # global kv heads, tokens per block, head size, bf16
CELL = 2 * D * ITEM  # K|V of one (token, head), bytes


class VllmRank:
    """One rank's layers over one int8 pool: [B, H, N, C] views in NHD (LBNHC) or HND (LBHNC)."""

    def __init__(self, order: str, blocks: int, heads: int, seed: int, tp: int = 1, *, slots: int = 1,
                 backend: str = "FLASHINFER", total: int | None = HEADS) -> None:
        h = heads * slots  # head slots in the tensor
        page = h * N * CELL
        if order == "NHD":
            st = (page, CELL, h * CELL, ITEM)
        else:
            st = (page, N * CELL, CELL, ITEM)
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=len(LAYERS) * blocks * page, dtype=np.int8)
        base = self.pool.ctypes.data
        self.shape, self.bstrides, self.page = (blocks, h, N, CELL), (*st[:3], 1), page
        tensors = tuple(TensorDescription(n, base + i * blocks * page, (blocks, h, N, 2 * D), st, ITEM)
                        for i, n in enumerate(LAYERS))
        extra = {"tp_size": tp, "num_kv_heads": heads, "head_size": D}
        if total is not None:
            extra["total_num_kv_heads"] = total
        if slots > 1:
            extra["slots_per_head"] = slots
        self.desc = CacheGroupDescription("vllm", 0, "attention", backend, "LBNHC" if order == "NHD" else "LBHNC",
                                          N, "torch.bfloat16", tensors, extra)

    def view(self, i: int, pool: np.ndarray | None = None) -> np.ndarray:
        """Layer i as [block, head slot, token, cell bytes]."""
        p = self.pool if pool is None else pool
        return as_strided(p[i * self.shape[0] * self.page:], shape=self.shape, strides=self.bstrides)


def heads_of(rank: int, tp: int) -> list[int]:
    per = HEADS // tp
    return list(range(rank * per, (rank + 1) * per))


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_vllm_pages(order):
    r = VllmRank(order, 5, HEADS, 1)
    lay = FlashInferParser().parse(r.desc)
    assert (lay.parser, lay.kind, lay.block_size, lay.moves) == ("flashinfer", "attention", N, "tokens")
    assert lay.detail == {"flashinfer_layout": order}
    page = HEADS * N * CELL
    for t, dsc in zip(lay.tensors, r.desc.tensors):
        assert (t.name, t.addr, t.num_blocks, t.block_stride) == (dsc.name, dsc.addr, 5, page)
        assert (t.unit_offsets, t.unit_bytes, t.logical) == ((0,), page, (HEADS, N, CELL))
        assert flashinfer_order(t) == order
        (reg,) = t.regions
        assert (reg.name, reg.itemsize, reg.shard.dim, reg.shard.groups) == ("kv", ITEM, "H", (HEADS,))
        h, n = reg.dim("H"), reg.dim("N")
        assert (h.stride, n.stride) == ((CELL, HEADS * CELL) if order == "NHD" else (N * CELL, CELL))
    assert dict(lay.signature) == {"kind": "attention", "content": "kv-fused", "dtype": "torch.bfloat16",
                                   "block_size": N, "cache_dtype": "auto"}


def test_single_head_is_nhd_and_tp_shard_comes_from_the_total():
    lay = FlashInferParser().parse(VllmRank("HND", 2, 1, 0, tp=4).desc)
    assert lay.detail["flashinfer_layout"] == "NHD"  # one head: both orders are the same bytes
    assert lay.tensors[0].regions[0].shard.groups == (HEADS,)  # total_num_kv_heads 4 replicated over 4 ranks
    lay = FlashInferParser().parse(VllmRank("NHD", 2, 2, 0, tp=2, total=None).desc)
    assert lay.tensors[0].regions[0].shard.groups == (4,)  # no total given: local heads x tp


@pytest.mark.parametrize("backend", sorted(VLLM_BACKENDS))
def test_accepts_flashinfer_backends(backend):
    assert FlashInferParser().parse(VllmRank("NHD", 2, HEADS, 0, backend=backend).desc).parser == "flashinfer"


@pytest.mark.parametrize("change", [
    {"backend": "FLASH_ATTN"}, {"backend": "CPU_ATTN"}, {"backend": "FLASHINFER_MLA"}, {"kind": "mla"},
    {"kind": "mamba"}, {"engine": "sglang"}, {"engine": "sglang", "backend": "MHATokenToKVPool", "layout": "nhd"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_declines_other_groups(change):
    desc = VllmRank("NHD", 2, HEADS, 0).desc
    assert FlashInferParser().parse(replace(desc, **change)) is None


def test_nhd_and_hnd_are_compatible_but_dtype_and_cache_dtype_are_not():
    a = FlashInferParser().parse(VllmRank("NHD", 2, HEADS, 0).desc)
    b = FlashInferParser().parse(VllmRank("HND", 3, 2, 1, tp=2).desc)
    check_compatible(a.signature, b.signature)
    desc = VllmRank("HND", 3, 2, 1, tp=2).desc
    fp8 = FlashInferParser().parse(replace(desc, extra={**desc.extra, "cache_dtype": "fp8"}))
    with pytest.raises(IncompatiblePeerError, match=r"cache_dtype: here='auto' peer='fp8'"):
        check_compatible(a.signature, fp8.signature)
    f16 = FlashInferParser().parse(replace(desc, dtype="torch.float16"))
    with pytest.raises(IncompatiblePeerError, match=r"dtype: here='torch.bfloat16' peer='torch.float16'"):
        check_compatible(a.signature, f16.signature)


def test_non_contiguous_content_is_refused():
    desc = VllmRank("NHD", 2, HEADS, 0).desc
    t = desc.tensors[0]
    bad = replace(t, strides=(t.strides[0] * 2, t.strides[1] * 2, t.strides[2] * 2, ITEM * 2))
    with pytest.raises(LayoutError, match=r"content dim has stride 4 bytes, not 2"):
        FlashInferParser().parse(replace(desc, tensors=(bad,)))


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize(("op", "od"), [("NHD", "HND"), ("HND", "NHD"), ("NHD", "NHD"), ("HND", "HND")])
def test_byte_exact_per_token_and_head(tp_p, tp_d, op, od):
    """Decode rank r ends with G[sb, its heads] in blocks db, whatever the two memory orders; nothing else moves."""
    g = np.random.default_rng(tp_p * 7 + tp_d).integers(-128, 128, size=(2, 6, HEADS, N, CELL), dtype=np.int8)
    p = [VllmRank(op, 6, HEADS // tp_p, 10 + r, tp_p) for r in range(tp_p)]
    d = [VllmRank(od, 7, HEADS // tp_d, 20 + r, tp_d) for r in range(tp_d)]
    for r, x in enumerate(p):
        for i in range(2):
            x.view(i)[:] = g[i][:, heads_of(r, tp_p)]
    sb, db = [4, 5, 0], [1, 2, 6]
    want = []
    for r, x in enumerate(d):
        w = x.pool.copy()
        for i in range(2):
            x.view(i, w)[db] = g[i][sb][:, heads_of(r, tp_d)]
        want.append(w)
    before = [x.pool.copy() for x in p]
    src = [FlashInferParser().parse(x.desc) for x in p]
    dst = [FlashInferParser().parse(x.desc) for x in d]
    for i in range(2):
        segs = copy_by_rank_pair([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        if tp_p == tp_d and op == od:
            assert set(segs.values()) == {2}  # blocks 4-5 -> 1-2 and 0 -> 6, whole pages
    for r, x in enumerate(d):
        np.testing.assert_array_equal(x.pool, want[r], err_msg=f"decode rank {r}")
    for x, b in zip(p, before):
        np.testing.assert_array_equal(x.pool, b)


def test_nvfp4_head_slots_split_k_and_v_over_tp():
    """Two slots per head (K slots then V slots): TP2 -> TP1 puts both ranks' K slots before both ranks' V slots."""
    ks = np.random.default_rng(1).integers(-128, 128, size=(4, HEADS, N, CELL), dtype=np.int8)
    vs = np.random.default_rng(2).integers(-128, 128, size=(4, HEADS, N, CELL), dtype=np.int8)
    p = [VllmRank("HND", 4, HEADS // 2, 30 + r, 2, slots=2) for r in range(2)]
    (d,) = [VllmRank("NHD", 4, HEADS, 40, 1, slots=2)]
    for r, x in enumerate(p):
        x.view(0)[:] = np.concatenate([ks[:, heads_of(r, 2)], vs[:, heads_of(r, 2)]], axis=1)
    src = [FlashInferParser().parse(x.desc) for x in p]
    dst = FlashInferParser().parse(d.desc)
    assert src[0].tensors[0].regions[0].shard.groups == (HEADS, HEADS)
    want = d.pool.copy()
    d.view(0, want)[[0, 3]] = np.concatenate([ks, vs], axis=1)[[2, 1]]
    copy_by_rank_pair([s.tensors[0] for s in src], [2, 1], [dst.tensors[0]], [0, 3])
    np.testing.assert_array_equal(d.pool, want)


def sglang_rank(pages: int, heads: int, seed: int, tp: int = 1, names=("layer0.k", "layer0.v"),
                page: int = N) -> tuple[list[np.ndarray], CacheGroupDescription]:
    bufs = [np.random.default_rng(seed + j).integers(-128, 128, size=(pages, heads, page, D * ITEM), dtype=np.int8)
            for j in range(2)]
    ts = tuple(TensorDescription(n, b.ctypes.data, (pages, heads, page, D), (heads * page * D * ITEM,
                                 page * D * ITEM, D * ITEM, ITEM), ITEM) for n, b in zip(names, bufs))
    return bufs, CacheGroupDescription("sglang", 0, "attention", "MHATokenToKVPool", "hnd", N, "bf16", ts,
                                       {"tp_size": tp, "total_num_kv_heads": HEADS})


def test_sglang_hnd_pool_tp1_to_tp2():
    (pk, pv), pdesc = sglang_rank(5, HEADS, 1)
    dec = [sglang_rank(6, HEADS // 2, 10 + 2 * r, 2) for r in range(2)]
    src = FlashInferParser().parse(pdesc)
    assert (src.signature["content"], src.detail["flashinfer_layout"]) == ("k,v", "HND")
    assert [t.regions[0].name for t in src.tensors] == ["k", "v"]
    assert [(x.name, x.size) for x in src.tensors[0].regions[0].dims] == [("H", HEADS), ("N", N), ("C", D)]
    dst = [FlashInferParser().parse(x[1]) for x in dec]
    want = [[b.copy() for b in bufs] for bufs, _ in dec]
    for r in range(2):
        for j, full in enumerate((pk, pv)):
            want[r][j][[0, 5]] = full[[3, 1]][:, heads_of(r, 2)]
    for j in range(2):
        copy_by_rank_pair([src.tensors[j]], [3, 1], [x.tensors[j] for x in dst], [0, 5])
    for r, (bufs, _) in enumerate(dec):
        for j in range(2):
            np.testing.assert_array_equal(bufs[j], want[r][j], err_msg=f"rank {r} {'kv'[j]}")


def test_sglang_errors_and_vllm_peer_mismatch():
    with pytest.raises(LayoutError, match=r"SGLang MHA tensor 'layer0.key' must be named '<layer>.k' or"):
        FlashInferParser().parse(sglang_rank(2, HEADS, 0, names=("layer0.key", "layer0.v"))[1])
    with pytest.raises(LayoutError, match=r"'layer0.k' has shape \(2, 4, 8, 8\); expected \[pages, H, page_size, D\]"):
        FlashInferParser().parse(sglang_rank(2, HEADS, 0, page=8)[1])
    _, sdesc = sglang_rank(2, HEADS, 0)
    sg = FlashInferParser().parse(sdesc)
    vl = FlashInferParser().parse(VllmRank("HND", 2, HEADS, 0).desc)
    with pytest.raises(IncompatiblePeerError, match=r"source block regions \['k'\], destination block regions \['kv'"):
        compile_template(sg.tensors[0], vl.tensors[0])
