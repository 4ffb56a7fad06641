"""dsa layout parser without vLLM: fp8_ds_mla latent + indexer pages over NumPy pools, byte-exact.

Per layer two tensors: the MLA latent (656 bytes per token in ``fp8_ds_mla``, or 576 bf16) and
the lightning-indexer page: block 64, **all 64 fp8 keys first (128 bytes each), then 64 fp32
scales** (132 bytes per token, not interleaved). vLLM shows ``[B, 1, 64, C]`` uint8 views,
SGLang's ``DSATokenToKVPool`` ``[rows, 1, 656]`` slots and ``[pages, 64 * 132]`` indexer pages.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from llumnix_kv_layout_dsa.parser import SPARSE_BACKENDS
from llumnix_kv_layout_dsa.parser import DsaParser
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.plan import tp_sources
from llumnix_kv_core.testing.layouts import copy_by_rank_pair

MLA = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
IDX = ["model.layers.0.self_attn.indexer.k_cache", "model.layers.1.self_attn.indexer.k_cache"]
BLOCK = 64
LATENT = 656  # fp8_ds_mla bytes per token
IDX_TOKEN = 132  # 128 fp8 key bytes + one fp32 scale
IDX_PAGE = BLOCK * IDX_TOKEN
ROLES = {**dict.fromkeys(MLA, "latent"), **dict.fromkeys(IDX, "indexer")}


class VllmRank:
    """One rank's DSA group: each layer (latent or indexer) its own tensor in one int8 pool, blocks padded."""

    def __init__(self, blocks: int, seed: int, tp: int = 1, *, pad: int = 0, latent_item: int = 1,
                 backend: str = "FLASHMLA_SPARSE", roles: dict | None = None) -> None:
        lc = LATENT if latent_item == 1 else 576
        self.latent_page = BLOCK * lc * latent_item
        self.strides = {n: self.latent_page + pad for n in MLA} | {n: IDX_PAGE + pad for n in IDX}
        self.offsets, off = {}, 0
        for n in MLA + IDX:
            self.offsets[n] = off
            off += blocks * self.strides[n]
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=off, dtype=np.int8)
        base = self.pool.ctypes.data
        tensors = []
        for n in MLA + IDX:
            c, item = (lc, latent_item) if n in MLA else (IDX_TOKEN, 1)
            tensors.append(TensorDescription(n, base + self.offsets[n], (blocks, 1, BLOCK, c),
                                             (self.strides[n], BLOCK * c * item, c * item, item), item))
        extra = {"tp_size": tp, "roles": ROLES if roles is None else roles,
                 "cache_dtype": "fp8_ds_mla" if latent_item == 1 else "auto"}
        self.blocks = blocks
        self.desc = CacheGroupDescription("vllm", 0, "mla", backend, "LBNHC", BLOCK, "torch.uint8" if latent_item == 1
                                          else "torch.bfloat16", tuple(tensors), extra)

    def page(self, name: str, pool: np.ndarray | None = None) -> np.ndarray:
        """[block, page bytes] of one layer."""
        p = self.pool if pool is None else pool
        size = self.latent_page if name in MLA else IDX_PAGE
        return as_strided(p[self.offsets[name]:], shape=(self.blocks, size), strides=(self.strides[name], 1))


def indexer_tokens(pages: np.ndarray) -> np.ndarray:
    """DeepSeek's reading of indexer pages: [block, token, 132] = the token's 128 key bytes then its 4 scale bytes."""
    keys = pages[:, :BLOCK * 128].reshape(-1, BLOCK, 128)
    scales = pages[:, BLOCK * 128:].reshape(-1, BLOCK, 4)
    return np.concatenate([keys, scales], axis=2)


def region_bytes(pool: np.ndarray, tl, block: int, region: str) -> np.ndarray:
    """Bytes of one region of one block, gathered through its dims: [*dims sizes, itemsize]."""
    reg = next(r for r in tl.regions if r.name == region)
    start = tl.addr - pool.ctypes.data + block * tl.block_stride + reg.offset
    return as_strided(pool[start:], shape=(*[d.size for d in reg.dims], reg.itemsize),
                      strides=(*[d.stride for d in reg.dims], 1))


def test_regions_latent_and_indexer():
    r = VllmRank(3, 1)
    lay = DsaParser().parse(r.desc)
    assert (lay.parser, lay.kind, lay.block_size) == ("dsa", "mla", BLOCK)
    assert [t.name for t in lay.tensors] == MLA + IDX
    lat = lay.tensors[0]
    (reg,) = lat.regions
    assert (reg.name, reg.itemsize, reg.shard) == ("latent", 1, None)
    assert [(d.name, d.size, d.stride) for d in reg.dims] == [("H", 1, BLOCK * LATENT), ("N", BLOCK, LATENT),
                                                               ("C", LATENT, 1)]
    idx = lay.tensor(IDX[0])
    keys, scales = idx.regions
    assert (keys.name, keys.offset, keys.itemsize, keys.shard) == ("index_k", 0, 1, None)
    assert [(d.name, d.size, d.stride) for d in keys.dims] == [("N", BLOCK, 128), ("C", 128, 1)]
    assert (scales.name, scales.offset, scales.itemsize) == ("index_scale", BLOCK * 128, 4)
    assert [(d.name, d.size, d.stride) for d in scales.dims] == [("N", BLOCK, 4)]
    assert (idx.unit_offsets, idx.unit_bytes, idx.block_stride) == ((0,), IDX_PAGE, IDX_PAGE)  # one run per page
    assert dict(lay.signature) == {"kind": "mla", "content": "dsa", "dtype": "torch.uint8", "block_size": BLOCK,
                                   "cache_dtype": "fp8_ds_mla", "latent_token_bytes": 656, "index_token_bytes": 132}


def test_indexer_regions_read_keys_first_then_scales():
    """Token t's key and scale, read through the regions, are DeepSeek's: bytes t*128.. and 8192 + t*4.."""
    r = VllmRank(3, 2)
    idx = DsaParser().parse(r.desc).tensor(IDX[1])
    for b in range(3):
        keys = region_bytes(r.pool, idx, b, "index_k")[:, :, 0]
        scales = region_bytes(r.pool, idx, b, "index_scale")  # [token, 4 bytes]
        np.testing.assert_array_equal(np.concatenate([keys, scales], axis=1), indexer_tokens(r.page(IDX[1]))[b])
        interleaved = r.page(IDX[1])[b].reshape(BLOCK, IDX_TOKEN)  # the wrong reading differs
        assert not np.array_equal(np.concatenate([keys, scales], axis=1), interleaved)


def test_bf16_latent_signature():
    lay = DsaParser().parse(VllmRank(2, 3, latent_item=2).desc)
    assert lay.signature["latent_token_bytes"] == 1152
    assert lay.tensors[0].regions[0].itemsize == 2
    with pytest.raises(IncompatiblePeerError, match=r"latent_token_bytes: here=656 peer=1152"):
        check_compatible(DsaParser().parse(VllmRank(2, 3).desc).signature, lay.signature)
    check_compatible(DsaParser().parse(VllmRank(2, 3).desc).signature,
                     DsaParser().parse(VllmRank(5, 4, tp=2, pad=64).desc).signature)


@pytest.mark.parametrize("backend", sorted(SPARSE_BACKENDS))
def test_accepts_sparse_backends(backend):
    assert DsaParser().parse(VllmRank(2, 0, backend=backend).desc).parser == "dsa"


def test_declines_other_groups():
    desc = VllmRank(2, 0).desc
    assert DsaParser().parse(replace(desc, kind="attention")) is None
    assert DsaParser().parse(replace(desc, kind="mamba")) is None
    plain = replace(desc, backend="FLASHMLA", tensors=desc.tensors[:2], extra={"tp_size": 1})
    assert DsaParser().parse(plain) is None  # a plain MLA group: the mla parser's
    assert DsaParser().parse(replace(desc, engine="sglang")) is None  # SGLang group, not a DSA pool
    assert DsaParser().parse(replace(desc, engine="trtllm")) is None


def test_errors_name_the_cause():
    desc = VllmRank(2, 0).desc
    no_idx = replace(desc, tensors=desc.tensors[:2], extra={"roles": {}})
    with pytest.raises(LayoutError, match=r"DSA cache group 0 needs latent and indexer tensors; roles given: none"):
        DsaParser().parse(no_idx)  # a sparse backend without indexer tensors
    only_idx = replace(desc, tensors=desc.tensors[2:])
    with pytest.raises(LayoutError, match=r"needs latent and indexer tensors; roles given: \['indexer', 'latent'\]"):
        DsaParser().parse(only_idx)
    t = desc.tensors[2]
    wide = replace(desc, tensors=(desc.tensors[0], replace(t, itemsize=2)))
    with pytest.raises(LayoutError, match=r"indexer tensor .*element size 2\); expected uint8 \[B, 1, N, C\]"):
        DsaParser().parse(wide)
    gappy = replace(desc, tensors=(desc.tensors[0], replace(t, strides=(IDX_PAGE * 2, IDX_PAGE * 2, 264, 1))))
    with pytest.raises(LayoutError, match=r"a block's 64x132 bytes are not one contiguous page"):
        DsaParser().parse(gappy)
    tiny = replace(desc, tensors=(desc.tensors[0], replace(t, shape=(2, 1, BLOCK, 4), strides=(256, 256, 4, 1))))
    with pytest.raises(LayoutError, match=r"4 bytes per token cannot hold fp8 keys and an fp32 scale"):
        DsaParser().parse(tiny)


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("pads", [(0, 0), (0, 128), (96, 0)])
def test_latent_and_indexer_byte_exact(tp_p, tp_d, pads):
    p = [VllmRank(6, 10 + r, tp_p, pad=pads[0]) for r in range(tp_p)]
    d = [VllmRank(7, 40 + r, tp_d, pad=pads[1]) for r in range(tp_d)]
    for x in p[1:]:  # replicated over TP
        for n in MLA + IDX:
            x.page(n)[:] = p[0].page(n)
    sb, db = [1, 2, 5], [6, 0, 1]
    want = []
    for x in d:
        w = x.pool.copy()
        for n in MLA + IDX:
            x.page(n, w)[db] = p[0].page(n)[sb]
        want.append(w)
    src = [DsaParser().parse(x.desc) for x in p]
    dst = [DsaParser().parse(x.desc) for x in d]
    for i, n in enumerate(MLA + IDX):
        segs = copy_by_rank_pair([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        for dr in range(tp_d):
            sent = {pr: c for (pr, dd), c in segs.items() if dd == dr and c}
            assert sent == {tp_sources(dr, tp_d, tp_p)[0]: 3}, n  # one page per block, from one prefill rank
    for r, x in enumerate(d):
        np.testing.assert_array_equal(x.pool, want[r], err_msg=f"decode rank {r}")
        for n in IDX:  # per token: key and scale together
            np.testing.assert_array_equal(indexer_tokens(x.page(n))[db], indexer_tokens(p[0].page(n))[sb])
        for n in MLA:
            np.testing.assert_array_equal(x.page(n)[db].reshape(-1, BLOCK, LATENT),
                                          p[0].page(n)[sb].reshape(-1, BLOCK, LATENT))


def sglang_desc(kv: np.ndarray, ix: np.ndarray, backend: str = "DSATokenToKVPool") -> CacheGroupDescription:
    tensors = (TensorDescription(MLA[0], kv.ctypes.data, kv.shape, (LATENT, LATENT, 1), 1),
               TensorDescription(IDX[0], ix.ctypes.data, ix.shape, (ix.shape[1], 1), 1))
    return CacheGroupDescription("sglang", 0, "mla", backend, "", BLOCK, "torch.uint8", tensors,
                                 {"roles": {MLA[0]: "latent", IDX[0]: "indexer"}, "cache_dtype": "fp8_ds_mla"})


def test_sglang_pool_to_vllm_and_back():
    rng = np.random.default_rng(8)
    kv = rng.integers(-128, 128, size=(4 * BLOCK, 1, LATENT), dtype=np.int8)
    ix = rng.integers(-128, 128, size=(4, IDX_PAGE), dtype=np.int8)
    sg = DsaParser().parse(sglang_desc(kv, ix))
    assert sg is not None
    lat, idx = sg.tensors
    assert (lat.num_blocks, lat.block_stride, lat.unit_bytes) == (4, BLOCK * LATENT, BLOCK * LATENT)
    assert [(d.name, d.size) for d in lat.regions[0].dims] == [("N", BLOCK), ("H", 1), ("C", LATENT)]
    assert [(r.name, r.offset) for r in idx.regions] == [("index_k", 0), ("index_scale", BLOCK * 128)]
    v = VllmRank(3, 9, pad=32)
    vl = DsaParser().parse(v.desc)
    check_compatible(dict(sg.signature), dict(vl.signature))
    for t in sg.tensors:
        copy_by_rank_pair([t], [2], [vl.tensor(t.name)], [1])
    np.testing.assert_array_equal(v.page(MLA[0])[1].reshape(BLOCK, LATENT), kv[2 * BLOCK:3 * BLOCK, 0])
    np.testing.assert_array_equal(indexer_tokens(v.page(IDX[0]))[1], indexer_tokens(ix)[2])
    kv2, ix2 = np.zeros_like(kv), np.zeros_like(ix)
    sg2 = DsaParser().parse(sglang_desc(kv2, ix2))
    for t in sg2.tensors:
        copy_by_rank_pair([vl.tensor(t.name)], [1], [t], [3])
    np.testing.assert_array_equal(kv2[3 * BLOCK:], kv[2 * BLOCK:3 * BLOCK])
    np.testing.assert_array_equal(ix2[3], ix[2])
    assert not kv2[:3 * BLOCK].any()
    assert not ix2[:3].any()


def test_sglang_errors_and_declines():
    kv = np.zeros((2 * BLOCK, 1, LATENT), dtype=np.int8)
    assert DsaParser().parse(sglang_desc(kv, np.zeros((2, IDX_PAGE), np.int8), backend="MLATokenToKVPool")) is None
    with pytest.raises(LayoutError, match=r"SGLang indexer tensor .* has shape \(2, 8447\); expected uint8"):
        DsaParser().parse(sglang_desc(kv, np.zeros((2, IDX_PAGE - 1), np.int8)))
