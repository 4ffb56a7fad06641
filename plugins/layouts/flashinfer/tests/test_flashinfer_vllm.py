"""flashinfer against vLLM 0.32's own layout code: NHD and HND pages, byte for byte, across TP pairs.

vLLM's FLASHINFER pages are ``[B, H, N, C]`` views (K|V fused) in LBNHC (FlashInfer "NHD") or
LBHNC ("HND"). A prefill side in one and a decode side in the other hold the same data: the
plan permutes during the copy, one (token, head) cell per segment. SGLang's HND pool
(``[pages, H, page_size, D]`` K and V buffers) is checked against its own indexing.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_flash_attn.parser import FlashAttnParser  # noqa: E402
from llumnix_kv_layout_flashinfer.parser import FlashInferParser  # noqa: E402
from llumnix_kv_layout_flashinfer.parser import flashinfer_order  # noqa: E402

from llumnix_kv_core.layout import CacheGroupDescription  # noqa: E402
from llumnix_kv_core.layout import TensorDescription  # noqa: E402
from llumnix_kv_core.layout import check_compatible  # noqa: E402
from llumnix_kv_core.testing.layouts import byte_view  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import heads_of_rank  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, BLOCK, HEAD = 4, 16, 16


def build(layout, tp, blocks, seed, backend="FLASHINFER"):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=max(HEADS // tp, 1), head_size=HEAD, dtype=torch.float16)
    return [vllm_group(spec, LAYERS, blocks, layout, kind="attention", backend=backend,
                       extra={"tp_size": tp, "total_num_kv_heads": HEADS}, seed=seed * 10 + r) for r in range(tp)]


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize(("src", "dst"), [("LBNHC", "LBHNC"), ("LBHNC", "LBNHC"), ("LBHNC", "LBHNC"),
                                          ("BLNHC", "LBHNC")])
def test_nhd_hnd_byte_exact(src, dst, tp_p, tp_d):
    p, d = build(src, tp_p, 6, 1), build(dst, tp_d, 7, 2)
    glob = torch.randint(-128, 128, (len(LAYERS), 6, HEADS, BLOCK, 4 * HEAD), dtype=torch.int8,
                         generator=torch.Generator().manual_seed(3))
    for r, g in enumerate(p):
        for i, n in enumerate(LAYERS):
            byte_view(g.pool, g.views[n])[:] = glob[i][:, heads_of_rank(r, tp_p, HEADS)]
    sb, db = [0, 1, 4], [6, 2, 3]
    want = []
    for r, g in enumerate(d):
        w = g.pool.clone()
        for i, n in enumerate(LAYERS):
            byte_view(w, g.views[n], g.pool)[db] = glob[i][sb][:, heads_of_rank(r, tp_d, HEADS)]
        want.append(w)
    sl = [FlashInferParser().parse(g.desc) for g in p]
    dl = [FlashInferParser().parse(g.desc) for g in d]
    assert {flashinfer_order(t) for t in sl[0].tensors} == {"HND" if "HN" in src and HEADS > tp_p else "NHD"}
    check_compatible(sl[0].signature, dl[0].signature)
    for i in range(len(LAYERS)):
        segs = copy_between_ranks([s.tensors[i] for s in sl], sb, [x.tensors[i] for x in dl], db)
        if src == dst and tp_p == tp_d:
            assert segs == [3] * tp_d  # one segment per block
    for r, g in enumerate(d):
        assert torch.equal(g.pool, want[r]), f"decode rank {r}"


def test_flash_attn_prefill_to_flashinfer_decode():
    """Different backends on the two sides (same fused K|V cells): compatible, and the data keeps its meaning."""
    (p,), (d,) = build("LBNHC", 1, 3, 4, backend="FLASH_ATTN"), build("LBHNC", 1, 3, 5)
    a, b = FlashAttnParser().parse(p.desc), FlashInferParser().parse(d.desc)
    check_compatible(a.signature, b.signature)
    copy_between_ranks([a.tensors[0]], [2], [b.tensors[0]], [0])
    assert torch.equal(d.views[LAYERS[0]][0].view(torch.int16), p.views[LAYERS[0]][2].view(torch.int16))


def test_sglang_hnd_pool():
    pages = 5
    k = torch.randn((pages, HEADS, BLOCK, HEAD), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    v = torch.randn((pages, HEADS, BLOCK, HEAD), generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)

    def desc(kt, vt):
        ts = tuple(TensorDescription(f"layer0.{s}", t.data_ptr(), tuple(t.shape),
                                     tuple(x * 2 for x in t.stride()), 2) for s, t in (("k", kt), ("v", vt)))
        return CacheGroupDescription("sglang", 0, "attention", "MHATokenToKVPool", "hnd", BLOCK, "bf16", ts)

    src, dst = FlashInferParser().parse(desc(k, v)), FlashInferParser().parse(desc(k2, v2))
    for i in range(2):
        copy_between_ranks([src.tensors[i]], [1, 2], [dst.tensors[i]], [3, 4])
    assert torch.equal(k2[3:5], k[1:3])
    assert torch.equal(v2[3:5], v[1:3])
    assert FlashAttnParser().parse(desc(k, v)) is None  # the NHD parser leaves HND pools alone


def test_declines_other_backends():
    (g,) = build("LBNHC", 1, 2, 6, backend="FLASH_ATTN")
    assert FlashInferParser().parse(g.desc) is None
