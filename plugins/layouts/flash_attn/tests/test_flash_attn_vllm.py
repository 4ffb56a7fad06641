"""flash_attn against vLLM 0.32's own layout code, byte for byte, over layouts and TP pairs.

Caches are allocated with ``compute_layout_strides`` / ``create_kv_cache_views`` for real
``FullAttentionSpec`` pages (K|V fused per cell). The prefill ranks hold their heads of one
global cache ``G[block, head, token, bytes]``; after plan + copy every decode rank must hold
``G[sb, its heads]`` in blocks ``db`` and not one byte may have changed elsewhere.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_flash_attn.parser import FlashAttnParser  # noqa: E402

from llumnix_kv_core.testing.layouts import byte_view  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import heads_of_rank  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
TP_PAIRS = [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (1, 4), (2, 2)]


def build(layout: str, tp: int, heads: int, num_blocks: int, block: int, head_size: int, seed: int,
          backend: str = "FLASH_ATTN"):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    local = max(heads // tp, 1)
    spec = FullAttentionSpec(block_size=block, num_kv_heads=local, head_size=head_size, dtype=torch.bfloat16)
    extra = {"tp_size": tp, "total_num_kv_heads": heads}
    return [vllm_group(spec, LAYERS, num_blocks, layout, kind="attention", backend=backend, extra=extra,
                       seed=seed * 100 + r) for r in range(tp)]


def run_case(parser, src_layout, dst_layout, tp_p, tp_d, heads, block, head_size, sb, db, nb_p, nb_d, seed,
             backend="FLASH_ATTN"):
    p = build(src_layout, tp_p, heads, nb_p, block, head_size, seed, backend)
    d = build(dst_layout, tp_d, heads, nb_d, block, head_size, seed + 1, backend)
    cell = 2 * head_size * 2
    glob = torch.randint(-128, 128, (len(LAYERS), nb_p, heads, block, cell), dtype=torch.int8,
                         generator=torch.Generator().manual_seed(seed))
    for r, g in enumerate(p):  # every prefill rank holds its heads of the global cache (replicas equal)
        for i, name in enumerate(LAYERS):
            byte_view(g.pool, g.views[name])[:] = glob[i][:, heads_of_rank(r, tp_p, heads)]
    expected = []
    for r, g in enumerate(d):
        want = g.pool.clone()
        for i, name in enumerate(LAYERS):
            byte_view(want, g.views[name], g.pool)[db] = glob[i][sb][:, heads_of_rank(r, tp_d, heads)]
        expected.append(want)
    src = [parser.parse(g.desc) for g in p]
    dst = [parser.parse(g.desc) for g in d]
    segments = []
    for i in range(len(LAYERS)):
        segments.append(copy_between_ranks([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db))
    for r, g in enumerate(d):
        assert torch.equal(g.pool, expected[r]), f"decode rank {r}"
    return segments


@pytest.mark.parametrize(("tp_p", "tp_d"), TP_PAIRS)
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC"])
def test_byte_exact_over_tp_pairs(layout, tp_p, tp_d):
    sb, db = [3, 4, 5, 0, 7], [6, 7, 8, 1, 2]
    segments = run_case(FlashAttnParser(), layout, layout, tp_p, tp_d, 4, 16, 32, sb, db, 9, 10, seed=tp_p * 7 + tp_d)
    if tp_p == tp_d:
        # equal layouts: one segment per run of consecutive blocks (3-5 -> 6-8, 0 -> 1, 7 -> 2) per layer
        want = 3 if layout.startswith("LB") else 5  # BL*: a block of one layer is not next to the next block
        assert all(s == [want] * tp_d for s in segments), segments


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 1)])
def test_replicated_kv_heads(tp_p, tp_d):
    """Two KV heads over up to 4 ranks: ranks hold replicas; one holder sends each head."""
    run_case(FlashAttnParser(), "LBNHC", "LBNHC", tp_p, tp_d, 2, 16, 32, [1, 2], [3, 0], 4, 4, seed=11)


def test_head_slices_of_token_major_pages_are_one_segment_per_token():
    segments = run_case(FlashAttnParser(), "LBNHC", "LBNHC", 2, 1, 4, 16, 32, [0, 1], [2, 3], 4, 4, seed=3)
    assert segments[0] == [2 * 2 * 16]  # 2 source ranks x 2 blocks x 16 tokens
    segments = run_case(FlashAttnParser(), "LBHNC", "LBHNC", 2, 1, 4, 16, 32, [0, 1], [2, 3], 4, 4, seed=3)
    assert segments[0] == [4]  # head-major: one segment per (source rank, block): its half page is contiguous in D


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_property(data):
    layout = data.draw(st.sampled_from(["LBNHC", "LBHNC", "LHBNC", "BLNHC", "BLHNC"]))
    tp_p, tp_d = data.draw(st.sampled_from(TP_PAIRS))
    heads = data.draw(st.sampled_from([1, 2, 4, 8]))
    block = data.draw(st.sampled_from([16, 32]))
    nb_p, nb_d = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    k = data.draw(st.integers(0, min(nb_p, nb_d)))
    db = data.draw(st.permutations(range(nb_d)))[:k]
    sb = data.draw(st.lists(st.integers(0, nb_p - 1), min_size=k, max_size=k))
    run_case(FlashAttnParser(), layout, layout, tp_p, tp_d, heads, block, 16, sb, db, nb_p, nb_d,
             seed=data.draw(st.integers(0, 1000)))
