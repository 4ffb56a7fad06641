"""dsa against vLLM 0.32's own specs for DeepSeek-V3.2: fp8_ds_mla latent + indexer pages, byte for byte.

DSA cannot run on vLLM's CPU platform, so this is the proof: one cache group of MLA layers
(``MLAAttentionSpec`` with ``cache_dtype_str="fp8_ds_mla"``, 656 bytes per token) and indexer
layers (``MLAAttentionSpec`` head_size 132 uint8, ``cache_role=INDEXER``), block size 64, views
from ``create_kv_cache_views``. The reference reads the indexer page as DeepSeek's kernels do:
all fp8 keys of the block first (128 bytes per token), then one fp32 scale per token.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_dsa.parser import DsaParser  # noqa: E402
from llumnix_kv_layout_mla.parser import MlaParser  # noqa: E402

from llumnix_kv_core.errors import LayoutError  # noqa: E402
from llumnix_kv_core.layout import CacheGroupDescription  # noqa: E402
from llumnix_kv_core.layout import TensorDescription  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

MLA = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
IDX = ["model.layers.0.self_attn.indexer.k_cache", "model.layers.1.self_attn.indexer.k_cache"]
BLOCK = 64


def build(tp: int, blocks: int, seed: int, latent: str = "fp8_ds_mla"):
    from vllm.v1.kv_cache_interface import MLAAttentionSpec
    from vllm.v1.kv_cache_interface import SparseCacheRole

    if latent == "fp8_ds_mla":
        mla = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.uint8,
                               cache_dtype_str="fp8_ds_mla", state_content_bytes=656)
    else:
        mla = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    idx = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=132, dtype=torch.uint8,
                           cache_role=SparseCacheRole.INDEXER)
    roles = {**dict.fromkeys(MLA, "latent"), **dict.fromkeys(IDX, "indexer")}
    return [vllm_group(mla, MLA + IDX, blocks, "LBNHC", kind="mla", backend="FLASHMLA_SPARSE",
                       extra={"tp_size": tp, "roles": roles, "cache_dtype": latent}, seed=seed * 10 + r,
                       spec_per_layer=dict.fromkeys(IDX, idx)) for r in range(tp)]


def raw(g, name, pool=None):
    """The layer's pages as raw bytes [blocks, page bytes] (over ``pool``, default its own)."""
    v = g.views[name]
    pool = g.pool if pool is None else pool
    page = v.shape[2] * v.shape[3] * v.element_size()
    return torch.as_strided(pool, (v.shape[0], page), (v.stride(0) * v.element_size(), 1),
                            v.data_ptr() - g.pool.data_ptr())


def token_meaning(pages, latent_bytes):
    """Per token: its latent row; per indexer token: its 128 key bytes and its 4 scale bytes."""
    return pages.view(pages.shape[0], BLOCK, latent_bytes)


def indexer_tokens(pages):
    keys = pages[:, : BLOCK * 128].reshape(-1, BLOCK, 128)
    scales = pages[:, BLOCK * 128:].reshape(-1, BLOCK, 4)
    return torch.cat([keys, scales], dim=2)  # [blocks, token, 132]: one token's key and scale together


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("latent", ["fp8_ds_mla", "bf16"])
def test_latent_and_indexer_byte_exact(tp_p, tp_d, latent):
    p, d = build(tp_p, 6, 1, latent), build(tp_d, 7, 2, latent)
    lb = 656 if latent == "fp8_ds_mla" else 1152
    assert p[0].views[MLA[0]].shape[-1] * p[0].views[MLA[0]].element_size() == lb
    assert tuple(p[0].views[IDX[0]].shape) == (6, 1, BLOCK, 132)
    for g in p[1:]:  # replicated over TP
        for n in MLA + IDX:
            raw(g, n)[:] = raw(p[0], n)
    sb, db = [1, 2, 5], [6, 0, 1]
    expected = []
    for g in d:
        want = g.pool.clone()
        for n in MLA + IDX:
            raw(g, n, want)[db] = raw(p[0], n)[sb]
        expected.append(want)
    src = [DsaParser().parse(g.desc) for g in p]
    dst = [DsaParser().parse(g.desc) for g in d]
    names = [t.name for t in src[0].tensors]
    for i, n in enumerate(names):
        segs = copy_between_ranks([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        assert segs == [3] * tp_d, (n, segs)  # one segment per (block, tensor), from one prefill rank
    for r, g in enumerate(d):
        assert torch.equal(g.pool, expected[r]), f"decode rank {r}"
        # and with per-token meaning: token t of block db[i] carries token t of block sb[i]
        for n in IDX:
            assert torch.equal(indexer_tokens(raw(g, n))[db], indexer_tokens(raw(p[0], n))[sb])
        for n in MLA:
            assert torch.equal(token_meaning(raw(g, n), lb)[db], token_meaning(raw(p[0], n), lb)[sb])


def test_indexer_regions_keep_key_and_scale_apart():
    (g,) = build(1, 2, 3)
    lay = DsaParser().parse(g.desc)
    idx = next(t for t in lay.tensors if t.name == IDX[0])
    keys, scales = idx.regions
    assert (keys.name, keys.offset, keys.dim("N").size, keys.dim("C").size) == ("index_k", 0, 64, 128)
    assert (scales.name, scales.offset, scales.itemsize) == ("index_scale", 64 * 128, 4)
    assert lay.signature["latent_token_bytes"] == 656
    assert lay.signature["index_token_bytes"] == 132
    assert MlaParser().parse(g.desc) is None  # the plain MLA parser leaves DSA groups alone


def test_group_without_indexer_is_refused():
    from dataclasses import replace

    (g,) = build(1, 2, 3)
    desc = replace(g.desc, tensors=g.desc.tensors[:2], extra={**g.desc.extra, "roles": {}})
    with pytest.raises(LayoutError, match=r"needs latent and indexer tensors"):
        DsaParser().parse(desc)


def test_sglang_dsa_pool():
    """SGLang DSATokenToKVPool: [rows, 1, 656] latent slots and [pages, 64*132] indexer pages per layer."""
    kv = torch.randint(0, 255, (4 * BLOCK, 1, 656), dtype=torch.uint8)
    ix = torch.randint(0, 255, (4, BLOCK * 132), dtype=torch.uint8)
    tensors = (TensorDescription(MLA[0], kv.data_ptr(), tuple(kv.shape), (656, 656, 1), 1),
               TensorDescription(IDX[0], ix.data_ptr(), tuple(ix.shape), (BLOCK * 132, 1), 1))
    desc = CacheGroupDescription("sglang", 0, "mla", "DSATokenToKVPool", "", BLOCK, "uint8", tensors,
                                 {"roles": {MLA[0]: "latent", IDX[0]: "indexer"}, "cache_dtype": "fp8_ds_mla"})
    sg = DsaParser().parse(desc)
    (g,) = build(1, 3, 9)
    full = DsaParser().parse(g.desc)
    dst = {t.name: t for t in full.tensors}
    for t in sg.tensors:
        copy_between_ranks([t], [2], [dst[t.name]], [1])
    assert torch.equal(raw(g, MLA[0])[1].view(BLOCK, 656), kv[2 * BLOCK:3 * BLOCK, 0].view(torch.int8))
    assert torch.equal(raw(g, IDX[0])[1], ix[2].view(torch.int8))
