"""mla layout parser without vLLM: hand-built descriptions over NumPy pools, byte-exact through the plan compiler.

vLLM registers an MLA layer as a ``[B, 1, N, 576]`` view (one latent row per token, bf16: 1152
bytes); SGLang's ``MLATokenToKVPool`` keeps ``[rows, 1, 576]`` token slots, a page of ``N`` rows
being one block. The latent is replicated over TP: each decode rank gets it from one prefill rank.
"""

from __future__ import annotations

import numpy as np
import pytest
from llumnix_kv_layout_mla.parser import MLA_BACKENDS
from llumnix_kv_layout_mla.parser import MlaParser
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.plan import tp_sources
from llumnix_kv_core.testing.layouts import copy_by_rank_pair

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
N, C, ITEM = 16, 576, 2  # tokens per block, latent elements per token, bf16
ROW = C * ITEM  # 1152 bytes per token
PAGE = N * ROW


class VllmRank:
    """One rank's MLA layers over one int8 pool: LBNHC (layer-major) or BLNHC (blocks outermost)."""

    def __init__(self, layout: str, blocks: int, seed: int, tp: int = 1, backend: str = "CPU_MLA",
                 item: int = ITEM, dtype: str = "torch.bfloat16") -> None:
        page = N * C * item
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=len(LAYERS) * blocks * page, dtype=np.int8)
        base = self.pool.ctypes.data
        if layout == "LBNHC":
            sb, bases = page, [base + i * blocks * page for i in range(len(LAYERS))]
        else:  # BLNHC: a block of one layer is strided by all layers
            sb, bases = len(LAYERS) * page, [base + i * page for i in range(len(LAYERS))]
        self.block_stride, self.page = sb, page
        self.offsets = [b - base for b in bases]
        self.blocks = blocks
        tensors = tuple(TensorDescription(n, a, (blocks, 1, N, C), (sb, page, C * item, item), item)
                        for n, a in zip(LAYERS, bases))
        self.desc = CacheGroupDescription("vllm", 0, "mla", backend, layout, N, dtype, tensors, {"tp_size": tp})

    def tokens(self, i: int, pool: np.ndarray | None = None) -> np.ndarray:
        """Layer i as [block, token, latent bytes]."""
        p = self.pool if pool is None else pool
        row = self.page // N
        return as_strided(p[self.offsets[i]:], shape=(self.blocks, N, row), strides=(self.block_stride, row, 1))


def sglang_desc(rows: np.ndarray, page: int = N, backend: str = "MLATokenToKVPool") -> CacheGroupDescription:
    t = TensorDescription(LAYERS[0], rows.ctypes.data, (rows.shape[0], 1, C), (ROW, ROW, ITEM), ITEM)
    return CacheGroupDescription("sglang", 0, "mla", backend, "", page, "bf16", (t,))


@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC"])
def test_vllm_latent_pages(layout):
    r = VllmRank(layout, 6, 1)
    lay = MlaParser().parse(r.desc)
    assert lay is not None
    assert (lay.parser, lay.kind, lay.block_size, lay.moves) == ("mla", "mla", N, "tokens")
    for t, d in zip(lay.tensors, r.desc.tensors):
        assert (t.name, t.addr, t.num_blocks, t.block_stride) == (d.name, d.addr, 6, r.block_stride)
        assert (t.unit_offsets, t.unit_bytes) == ((0,), PAGE)  # a block's 16 latent rows are one run
        (reg,) = t.regions
        assert (reg.name, reg.itemsize, reg.shard) == ("latent", ITEM, None)  # replicated over TP
        assert [(x.name, x.size, x.stride) for x in reg.dims] == [("H", 1, PAGE), ("N", N, ROW), ("C", C, ITEM)]
    assert dict(lay.signature) == {"kind": "mla", "content": "mla-latent", "dtype": "torch.bfloat16",
                                   "block_size": N, "cache_dtype": "auto", "token_bytes": 1152}


@pytest.mark.parametrize("backend", sorted(MLA_BACKENDS))
def test_accepts_every_mla_backend(backend):
    assert MlaParser().parse(VllmRank("LBNHC", 2, 0, backend=backend).desc).parser == "mla"


def _replace(desc: CacheGroupDescription, **kw) -> CacheGroupDescription:
    from dataclasses import replace

    return replace(desc, **kw)


@pytest.mark.parametrize("change", [
    {"backend": "FLASHMLA_SPARSE"}, {"backend": "FLASH_ATTN"}, {"kind": "attention"}, {"kind": "mamba"},
    {"engine": "sglang"},  # an SGLang group with a vLLM backend name
    {"extra": {"roles": {LAYERS[0]: "latent", LAYERS[1]: "indexer"}}},  # a DSA group: the dsa parser's
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_declines_other_groups(change):
    desc = VllmRank("LBNHC", 2, 0).desc
    assert MlaParser().parse(desc) is not None
    assert MlaParser().parse(_replace(desc, **change)) is None


def test_explicit_latent_roles_are_accepted():
    desc = VllmRank("LBNHC", 2, 0).desc
    assert MlaParser().parse(_replace(desc, extra={"roles": dict.fromkeys(LAYERS, "latent")})) is not None


def test_errors_name_the_cause():
    bad = TensorDescription("x", 0, (2, 1, N, C), (PAGE * 2, PAGE * 2, ROW * 2, ITEM * 2), ITEM)
    with pytest.raises(LayoutError, match=r"'x': the content dim has stride 4 bytes, not 2"):
        MlaParser().parse(CacheGroupDescription("vllm", 0, "mla", "CPU_MLA", "LBNHC", N, "bf16", (bad,)))
    flat = TensorDescription("y", 0, (2, N, C), (PAGE, ROW, ITEM), ITEM)
    with pytest.raises(LayoutError, match=r"'y' has shape \(2, 16, 576\); a \[blocks, heads, tokens, content\]"):
        MlaParser().parse(CacheGroupDescription("vllm", 0, "mla", "CPU_MLA", "LBNHC", N, "bf16", (flat,)))
    rows = np.zeros((5 * N + 3, 1, ROW), dtype=np.int8)
    with pytest.raises(LayoutError, match=r"83 rows, not a multiple of the page size 16"):
        MlaParser().parse(sglang_desc(rows))


def test_fp8_latent_is_incompatible_with_bf16():
    bf16 = MlaParser().parse(VllmRank("LBNHC", 2, 0).desc)
    fp8 = MlaParser().parse(VllmRank("LBNHC", 2, 0, item=1, dtype="torch.uint8").desc)
    assert fp8.signature["token_bytes"] == 576
    with pytest.raises(IncompatiblePeerError, match=r"token_bytes: here=1152 peer=576"):
        check_compatible(bf16.signature, fp8.signature)
    check_compatible(bf16.signature, MlaParser().parse(VllmRank("BLNHC", 3, 9, tp=4).desc).signature)


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize(("lp", "ld"), [("LBNHC", "LBNHC"), ("BLNHC", "LBNHC"), ("LBNHC", "BLNHC")])
def test_replicated_latent_byte_exact(tp_p, tp_d, lp, ld):
    """Each decode rank gets the latent rows of ``sb`` from exactly one prefill rank; nothing else changes."""
    p = [VllmRank(lp, 8, 10 + r, tp_p) for r in range(tp_p)]
    d = [VllmRank(ld, 9, 50 + r, tp_d) for r in range(tp_d)]
    glob = [np.random.default_rng(99 + i).integers(-128, 128, size=(8, N, ROW), dtype=np.int8) for i in range(2)]
    for x in p:  # replicated: every prefill rank holds the same latent
        for i in range(2):
            x.tokens(i)[:] = glob[i]
    sb, db = [2, 3, 4, 7], [0, 1, 2, 8]
    want = []
    for r in d:
        w = r.pool.copy()
        for i in range(2):
            r.tokens(i, w)[db] = glob[i][sb]
        want.append(w)
    src = [MlaParser().parse(x.desc) for x in p]
    dst = [MlaParser().parse(x.desc) for x in d]
    for i in range(2):
        segs = copy_by_rank_pair([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        for dr in range(tp_d):
            senders = [pr for (pr, dd), n in segs.items() if dd == dr and n]
            assert senders == [tp_sources(dr, tp_d, tp_p)[0]]  # one prefill rank sends, the others nothing
            contiguous = lp == ld == "LBNHC"
            assert segs[senders[0], dr] == (2 if contiguous else 4)  # runs 2-4 -> 0-2 and 7 -> 8
    for r, x in enumerate(d):
        np.testing.assert_array_equal(x.pool, want[r], err_msg=f"decode rank {r}")


def test_only_the_first_holder_sends():
    """With differing replicas, the decode rank's bytes come from prefill rank tp_sources()[0] and no other."""
    p = [VllmRank("LBNHC", 4, 200 + r, 2) for r in range(2)]
    (d,) = [VllmRank("LBNHC", 4, 300, 1)]
    src = [MlaParser().parse(x.desc) for x in p]
    copy_by_rank_pair([s.tensors[0] for s in src], [1], [MlaParser().parse(d.desc).tensors[0]], [3])
    np.testing.assert_array_equal(d.tokens(0)[3], p[0].tokens(0)[1])
    assert not np.array_equal(d.tokens(0)[3], p[1].tokens(0)[1])


def test_sglang_slots_and_vllm_pages_both_ways():
    """SGLang rows [b*16, (b+1)*16) are block b; the latent of every token lands in the right vLLM row."""
    rows = np.random.default_rng(3).integers(-128, 128, size=(5 * N, 1, ROW), dtype=np.int8)
    sg = MlaParser().parse(sglang_desc(rows))
    assert sg is not None
    assert sg.parser == "mla"
    (t,) = sg.tensors
    assert (t.num_blocks, t.block_stride, t.unit_offsets, t.unit_bytes) == (5, PAGE, (0,), PAGE)
    assert [(x.name, x.size) for x in t.regions[0].dims] == [("N", N), ("H", 1), ("C", C)]
    assert sg.signature["token_bytes"] == MlaParser().parse(VllmRank("LBNHC", 2, 0).desc).signature["token_bytes"]
    v = VllmRank("BLNHC", 4, 7)
    before = v.pool.copy()
    copy_by_rank_pair([t], [3, 1], [MlaParser().parse(v.desc).tensors[0]], [1, 2])
    np.testing.assert_array_equal(v.tokens(0)[1], rows[48:64, 0])
    np.testing.assert_array_equal(v.tokens(0)[2], rows[16:32, 0])
    v.tokens(0, before)[[1, 2]] = v.tokens(0)[[1, 2]]
    np.testing.assert_array_equal(v.pool, before)  # nothing else touched
    back = np.zeros_like(rows)
    sg_back = MlaParser().parse(sglang_desc(back))
    copy_by_rank_pair([MlaParser().parse(v.desc).tensors[0]], [2], [sg_back.tensors[0]], [4])
    np.testing.assert_array_equal(back[64:80, 0], rows[16:32, 0])
    assert not back[:64].any()


def test_sglang_declines_other_pools():
    rows = np.zeros((2 * N, 1, ROW), dtype=np.int8)
    assert MlaParser().parse(sglang_desc(rows, backend="MHATokenToKVPool")) is None
    assert MlaParser().parse(sglang_desc(rows, backend="DSATokenToKVPool")) is None
