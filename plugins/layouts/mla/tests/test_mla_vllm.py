"""mla against vLLM 0.32's own MLAAttentionSpec pages (CPU_MLA's [B, 1, 16, 576]), byte for byte.

The latent is replicated over TP: every decode rank gets the full latent from exactly one
prefill rank, and the other prefill ranks send nothing.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_mla.parser import MlaParser  # noqa: E402

from llumnix_kv_core.layout import CacheGroupDescription  # noqa: E402
from llumnix_kv_core.layout import TensorDescription  # noqa: E402
from llumnix_kv_core.testing.layouts import byte_view  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def build(tp: int, blocks: int, seed: int, layout: str = "LBNHC", block: int = 16):
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    spec = MLAAttentionSpec(block_size=block, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    return [vllm_group(spec, LAYERS, blocks, layout, kind="mla", backend="CPU_MLA", extra={"tp_size": tp},
                       seed=seed * 10 + r) for r in range(tp)]


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4), (8, 1)])
@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC"])
def test_replicated_latent_byte_exact(tp_p, tp_d, layout):
    p, d = build(tp_p, 8, 1, layout), build(tp_d, 9, 2, layout)
    glob = torch.randint(-128, 128, (len(LAYERS), 8, 1, 16, 1152), dtype=torch.int8,
                         generator=torch.Generator().manual_seed(5))
    for g in p:
        for i, name in enumerate(LAYERS):
            byte_view(g.pool, g.views[name])[:] = glob[i]
    sb, db = [2, 3, 4, 7], [0, 1, 2, 8]
    expected = []
    for g in d:
        want = g.pool.clone()
        for i, name in enumerate(LAYERS):
            byte_view(want, g.views[name], g.pool)[db] = glob[i][sb]
        expected.append(want)
    src = [MlaParser().parse(g.desc) for g in p]
    dst = [MlaParser().parse(g.desc) for g in d]
    for i in range(len(LAYERS)):
        segs = copy_between_ranks([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        assert segs == [2 if layout == "LBNHC" else 4] * tp_d  # runs 2-4 -> 0-2 and 7 -> 8; one sender each
    for r, g in enumerate(d):
        assert torch.equal(g.pool, expected[r]), f"decode rank {r}"


def test_signature_and_declines():
    (g,) = build(1, 2, 3)
    lay = MlaParser().parse(g.desc)
    assert lay.signature["content"] == "mla-latent"
    assert lay.signature["token_bytes"] == 1152
    assert lay.tensors[0].regions[0].shard is None
    from dataclasses import replace

    assert MlaParser().parse(replace(g.desc, backend="FLASHMLA_SPARSE")) is None
    assert MlaParser().parse(replace(g.desc, kind="attention")) is None


def test_sglang_mla_pool_to_vllm_page():
    """SGLang MLATokenToKVPool slots [rows, 1, 576], page 16, into a vLLM CPU_MLA page: same latent per token."""
    rows = torch.randn((5 * 16, 1, 576), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    t = TensorDescription(LAYERS[0], rows.data_ptr(), tuple(rows.shape), (1152, 1152, 2), 2)
    sg = MlaParser().parse(CacheGroupDescription("sglang", 0, "mla", "MLATokenToKVPool", "", 16, "bf16", (t,)))
    (d,) = build(1, 4, 7)
    dst = MlaParser().parse(d.desc)
    copy_between_ranks([sg.tensors[0]], [3], [dst.tensors[0]], [1])
    assert torch.equal(d.views[LAYERS[0]][1, 0], rows[48:64, 0])
