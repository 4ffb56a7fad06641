"""cpu_attn against vLLM 0.32's own CPU attention pages: whole (block, head) tiles, byte for byte.

The caches are built with ``create_kv_cache_views`` in CPU_ATTN's only layout (LBHNC) and the
ISA comes from vLLM's own ``_get_attn_isa``. A tile's bytes have no per-token meaning (K packed
per ISA, then V), so the reference is per (block, head): decode rank r must hold, in block
``db[i]`` head j, the prefill tile of block ``sb[i]`` and global head ``heads_of_rank(r)[j]``.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_cpu_attn.parser import CpuAttnParser  # noqa: E402

from llumnix_kv_core.errors import IncompatiblePeerError  # noqa: E402
from llumnix_kv_core.layout import check_compatible  # noqa: E402
from llumnix_kv_core.testing.layouts import byte_view  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import heads_of_rank  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, BLOCK, HEAD = 4, 32, 32


def build(tp, blocks, seed, isa=None):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=max(HEADS // tp, 1), head_size=HEAD,
                             dtype=torch.bfloat16)
    extra = {"tp_size": tp, "total_num_kv_heads": HEADS, "head_size": HEAD,
             "isa": isa or _get_attn_isa(torch.bfloat16, BLOCK, HEAD, "auto")}
    return [vllm_group(spec, LAYERS, blocks, "LBHNC", kind="attention", backend="CPU_ATTN", extra=extra,
                       seed=seed * 10 + r) for r in range(tp)]


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)])
def test_head_tiles_byte_exact(tp_p, tp_d):
    p, d = build(tp_p, 5, 1), build(tp_d, 6, 2)
    tiles = torch.randint(-128, 128, (len(LAYERS), 5, HEADS, BLOCK * 4 * HEAD), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(tp_p * 10 + tp_d))
    for r, g in enumerate(p):
        for i, n in enumerate(LAYERS):
            byte_view(g.pool, g.views[n]).reshape(5, -1, BLOCK * 4 * HEAD)[:] = \
                tiles[i][:, heads_of_rank(r, tp_p, HEADS)]
    sb, db = [0, 1, 4], [5, 0, 1]
    want = []
    for r, g in enumerate(d):
        w = g.pool.clone()
        for i, n in enumerate(LAYERS):
            v = byte_view(w, g.views[n], g.pool)
            for j, h in enumerate(heads_of_rank(r, tp_d, HEADS)):
                v[db, j] = tiles[i][sb, h].view(len(sb), BLOCK, 4 * HEAD)
        want.append(w)
    sl = [CpuAttnParser().parse(g.desc) for g in p]
    dl = [CpuAttnParser().parse(g.desc) for g in d]
    for i in range(len(LAYERS)):
        segs = copy_between_ranks([s.tensors[i] for s in sl], sb, [x.tensors[i] for x in dl], db)
        if tp_p == tp_d:
            assert segs == [3] * tp_d  # a page of whole head tiles is contiguous: one segment per block
    for r, g in enumerate(d):
        assert torch.equal(g.pool, want[r]), f"decode rank {r}"


def test_isa_mismatch_is_refused_naming_both():
    (a,), (b,) = build(1, 2, 3, isa="amx"), build(1, 2, 4, isa="vec")
    with pytest.raises(IncompatiblePeerError, match=r"isa: here='amx' peer='vec'"):
        check_compatible(CpuAttnParser().parse(a.desc).signature, CpuAttnParser().parse(b.desc).signature)
