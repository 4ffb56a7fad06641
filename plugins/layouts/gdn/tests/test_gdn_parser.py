"""gdn layout parser without vLLM: GDN state slots over NumPy pools, byte-exact across conv layouts and TP.

A vLLM state slot (``[B, 1, 1, page]`` int8, padded) holds the conv state, ``(S, Q|K|V)`` (SD) or
``(Q|K|V, S)`` (DS), each of Q, K, V split over TP on its own, then the temporal state ``(value heads,
v, k)`` split by value heads. SGLang's ``MambaPool`` keeps ``[slots, conv_dim/tp, S]`` and
``[slots, heads/tp, v, k]`` per layer. The reference indexes a global state per channel and per head.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from llumnix_kv_layout_gdn.parser import GdnParser

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import MOVES_LAST_STATE
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.testing.layouts import copy_by_rank_pair

LAYERS = ["model.layers.0.linear_attn", "model.layers.1.linear_attn"]
NK, NV, HK, HV, S = 2, 4, 16, 8, 3  # key heads, value heads, head dims, conv state length (kernel - 1)
KEY, VALUE = NK * HK, NV * HV
CONV = 2 * KEY + VALUE  # Q | K | V channels
PAD = 96


def rank_channels(rank: int, tp: int) -> list[int]:
    """Global conv channels rank ``rank`` holds, in its local order: its Q slice, its K slice, its V slice."""
    k, v = KEY // tp, VALUE // tp
    return [*range(rank * k, rank * k + k), *range(KEY + rank * k, KEY + rank * k + k),
            *range(2 * KEY + rank * v, 2 * KEY + rank * v + v)]


def rank_heads(rank: int, tp: int) -> list[int]:
    return list(range(rank * NV // tp, (rank + 1) * NV // tp))


def shapes(tp: int, layout: str) -> list[list[int]]:
    return [[CONV // tp, S] if layout == "DS" else [S, CONV // tp], [NV // tp, HV, HK]]


class VllmRank:
    """One rank's GDN layers: per layer a ``[slots, 1, 1, padded page]`` int8 tensor over one pool."""

    def __init__(self, tp: int, layout: str, slots: int, seed: int) -> None:
        self.tp, self.layout, self.slots = tp, layout, slots
        self.conv_bytes = CONV // tp * S * 2
        self.real = self.conv_bytes + NV // tp * HV * HK * 4
        self.stride = self.real + PAD
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=len(LAYERS) * slots * self.stride,
                                                         dtype=np.int8)
        base = self.pool.ctypes.data
        tensors = tuple(TensorDescription(n, base + i * slots * self.stride, (slots, 1, 1, self.stride),
                                          (self.stride, self.stride, self.stride, 1), 1) for i, n in enumerate(LAYERS))
        extra = {"tp_size": tp, "shapes": shapes(tp, layout), "itemsizes": [2, 4], "dtypes": "bf16,fp32",
                 "mamba_type": "GDN_ATTN", "conv_layout": layout}
        self.desc = CacheGroupDescription("vllm", 1, "mamba", "GDN_ATTN", "LBNHC", 256, "int8", tensors, extra)

    def pages(self, i: int, pool: np.ndarray | None = None) -> np.ndarray:
        p = self.pool if pool is None else pool
        return p[i * self.slots * self.stride:(i + 1) * self.slots * self.stride].reshape(self.slots, self.stride)

    def write(self, i: int, slot: int, gconv: np.ndarray, gssm: np.ndarray, pool: np.ndarray | None = None) -> None:
        """Store this rank's slice of the global states (conv [S, CONV] uint16, ssm [NV, HV, HK] uint32)."""
        c = gconv[:, rank_channels(self.rank, self.tp)]
        c = np.ascontiguousarray(c.T if self.layout == "DS" else c)
        s = np.ascontiguousarray(gssm[rank_heads(self.rank, self.tp)])
        page = self.pages(i, pool)[slot]
        page[:self.conv_bytes] = c.view(np.int8).reshape(-1)
        page[self.conv_bytes:self.real] = s.view(np.int8).reshape(-1)

    rank = 0


def vllm_ranks(tp: int, layout: str, slots: int, seed: int) -> list[VllmRank]:
    out = []
    for r in range(tp):
        x = VllmRank(tp, layout, slots, seed + r)
        x.rank = r
        out.append(x)
    return out


@pytest.mark.parametrize("layout", ["SD", "DS"])
def test_regions_follow_the_qkv_split(layout):
    (x,) = vllm_ranks(1, layout, 3, 0)
    lay = GdnParser().parse(x.desc)
    assert (lay.parser, lay.kind, lay.group_id, lay.moves) == ("gdn", "mamba", 1, MOVES_LAST_STATE)
    assert lay.detail == {"conv_layout": layout}
    for t in lay.tensors:
        conv, ssm = t.regions
        assert (conv.name, conv.offset, conv.itemsize) == ("conv", 0, 2)
        assert (conv.shard.dim, conv.shard.groups) == ("D", (KEY, KEY, VALUE))
        dims = [(d.name, d.size, d.stride) for d in conv.dims]
        assert dims == ([("D", CONV, S * 2), ("S", S, 2)] if layout == "DS" else [("S", S, CONV * 2), ("D", CONV, 2)])
        assert (ssm.name, ssm.offset, ssm.itemsize) == ("ssm", CONV * S * 2, 4)
        assert [(d.name, d.size, d.stride) for d in ssm.dims] == [("H", NV, HV * HK * 4), ("V", HV, HK * 4),
                                                                  ("K", HK, 4)]
        assert (ssm.shard.dim, ssm.shard.groups) == ("H", (NV,))
        assert (t.num_blocks, t.block_stride) == (3, x.real + PAD)  # the padded page is the stride
        assert (t.unit_offsets, t.unit_bytes) == ((0,), x.real)  # the padding is not moved
    assert dict(lay.signature) == {"kind": "mamba", "content": "gdn", "dtype": "bf16,fp32", "block_size": 256,
                                   "state_len": S, "key_dim": KEY, "value_dim": VALUE, "num_v_heads": NV,
                                   "head_v_dim": HV, "head_k_dim": HK}


def test_tp2_shards_name_global_groups_and_signatures_agree():
    p = GdnParser().parse(vllm_ranks(2, "DS", 2, 0)[1].desc)
    conv, ssm = p.tensors[0].regions
    assert conv.dim("D").size == CONV // 2
    assert conv.shard.groups == (KEY, KEY, VALUE)
    assert ssm.dim("H").size == NV // 2
    assert ssm.shard.groups == (NV,)
    check_compatible(p.signature, GdnParser().parse(vllm_ranks(1, "SD", 2, 0)[0].desc).signature)
    desc = vllm_ranks(1, "SD", 2, 0)[0].desc
    big = tuple(replace(t, shape=(2, 1, 1, 4096), strides=(4096, 4096, 4096, 1)) for t in desc.tensors)
    other = GdnParser().parse(replace(desc, tensors=big, extra={**desc.extra, "shapes": [[4, CONV], [NV, HV, HK]]}))
    with pytest.raises(IncompatiblePeerError, match=r"state_len: here=3 peer=4"):
        check_compatible(p.signature, other.signature)


def test_declines_other_groups():
    desc = vllm_ranks(1, "SD", 2, 0)[0].desc
    assert GdnParser().parse(desc) is not None
    assert GdnParser().parse(replace(desc, extra={**desc.extra, "mamba_type": "MAMBA2"})) is None
    assert GdnParser().parse(replace(desc, extra={k: v for k, v in desc.extra.items() if k != "mamba_type"})) is None
    assert GdnParser().parse(replace(desc, kind="attention")) is None
    assert GdnParser().parse(replace(desc, engine="sglang", backend="MHATokenToKVPool")) is None
    assert GdnParser().parse(replace(desc, extra={**desc.extra, "mamba_type": "gdn_attn"})) is not None


def test_errors_name_the_cause():
    desc = vllm_ranks(1, "SD", 2, 0)[0].desc
    ex = desc.extra
    with pytest.raises(LayoutError, match=r"GDN cache group 1: expected two states \(conv, temporal\)"):
        GdnParser().parse(replace(desc, extra={**ex, "shapes": [[S, CONV]]}))
    with pytest.raises(LayoutError, match=r"conv dim 97 does not split into Q\|K\|V with value dim 32"):
        GdnParser().parse(replace(desc, extra={**ex, "shapes": [[S, CONV + 1], [NV, HV, HK]]}))
    with pytest.raises(LayoutError, match=r"expected a 2-D conv and a 3-D temporal"):
        GdnParser().parse(replace(desc, extra={**ex, "shapes": [[S, CONV], [NV, HV * HK]]}))
    with pytest.raises(LayoutError, match=r"unknown GDN conv state layout 'SDX'"):
        GdnParser().parse(replace(desc, extra={**ex, "conv_layout": "SDX"}))
    t = desc.tensors[0]
    small = replace(t, shape=(2, 1, 1, 100))
    with pytest.raises(LayoutError, match=r"cannot hold the \d+-byte state page"):
        GdnParser().parse(replace(desc, tensors=(small,)))


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize(("lp", "ld"), [("SD", "SD"), ("DS", "DS"), ("SD", "DS"), ("DS", "SD")])
def test_last_state_moves_byte_exact(tp_p, tp_d, lp, ld):
    """Decode rank r ends with its Q, K, V channel slices and value heads of prefill slot sb, in slot db."""
    rng = np.random.default_rng(tp_p * 10 + tp_d)
    gconv = rng.integers(0, 1 << 16, size=(2, S, CONV), dtype=np.uint16)
    gssm = rng.integers(0, 1 << 32, size=(2, NV, HV, HK), dtype=np.uint32)
    p, d = vllm_ranks(tp_p, lp, 5, 100), vllm_ranks(tp_d, ld, 6, 200)
    sb, db = [3], [5]
    for x in p:
        for i in range(2):
            x.write(i, 3, gconv[i], gssm[i])
    want = []
    for x in d:
        w = x.pool.copy()
        for i in range(2):
            x.write(i, 5, gconv[i], gssm[i], w)
        want.append(w)
    before = [x.pool.copy() for x in p]
    src = [GdnParser().parse(x.desc) for x in p]
    dst = [GdnParser().parse(x.desc) for x in d]
    for i in range(2):
        segs = copy_by_rank_pair([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        if tp_p == tp_d and lp == ld:
            assert set(segs.values()) == {1}  # one state page, conv + temporal, is one segment
    for r, x in enumerate(d):
        np.testing.assert_array_equal(x.pool, want[r], err_msg=f"decode rank {r}")
    for x, b in zip(p, before):
        np.testing.assert_array_equal(x.pool, b)


def test_p_tp2_to_d_tp1_concatenates_channel_groups():
    """Explicitly: after TP2 -> TP1 the conv channels read Q0 Q1 K0 K1 V0 V1, not rank 0's Q|K|V then rank 1's."""
    rng = np.random.default_rng(5)
    gconv = rng.integers(0, 1 << 16, size=(S, CONV), dtype=np.uint16)
    gssm = rng.integers(0, 1 << 32, size=(NV, HV, HK), dtype=np.uint32)
    p, (d,) = vllm_ranks(2, "SD", 2, 1), vllm_ranks(1, "SD", 2, 2)
    for x in p:
        x.write(0, 1, gconv, gssm)
    sources = [GdnParser().parse(x.desc).tensors[0] for x in p]
    copy_by_rank_pair(sources, [1], [GdnParser().parse(d.desc).tensors[0]], [0])
    page = d.pages(0)[0]
    conv = page[:d.conv_bytes].copy().view(np.uint16).reshape(S, CONV)
    np.testing.assert_array_equal(conv, gconv)
    naive = np.concatenate([gconv[:, rank_channels(r, 2)] for r in range(2)], axis=1)
    assert not np.array_equal(conv, naive)
    np.testing.assert_array_equal(page[d.conv_bytes:d.real].copy().view(np.uint32).reshape(NV, HV, HK), gssm)


def sglang_rank(tp: int, slots: int, seed: int, names=("layer0.conv", "layer0.ssm")):
    rng = np.random.default_rng(seed)
    conv = rng.integers(0, 1 << 16, size=(slots, CONV // tp, S), dtype=np.uint16)
    ssm = rng.integers(0, 1 << 32, size=(slots, NV // tp, HV, HK), dtype=np.uint32)
    tensors = tuple(TensorDescription(n, a.ctypes.data, a.shape, a.strides, a.itemsize)
                    for n, a in zip(names, (conv, ssm)))
    extra = {"tp_size": tp, "shapes": [list(conv.shape[1:]), list(ssm.shape[1:])], "itemsizes": [2, 4],
             "mamba_type": "gdn_attn"}
    return conv, ssm, CacheGroupDescription("sglang", 1, "mamba", "MambaPool", "", 1, "bf16", tensors, extra)


def test_sglang_mamba_pool_tp1_to_tp2():
    pc, ps, pdesc = sglang_rank(1, 9, 1)
    dec = [sglang_rank(2, 9, 10 + r) for r in range(2)]
    src = GdnParser().parse(pdesc)
    assert src.moves == MOVES_LAST_STATE
    assert [r.name for t in src.tensors for r in t.regions] == ["conv", "ssm"]
    assert [d.name for d in src.tensors[0].regions[0].dims] == ["D", "S"]  # SGLang conv is dim-first (DS)
    assert src.tensors[0].block_stride == CONV * S * 2
    dst = [GdnParser().parse(x[2]) for x in dec]
    check_compatible(src.signature, dst[0].signature)
    want = [(c.copy(), s.copy()) for c, s, _ in dec]
    for r in range(2):
        want[r][0][7] = pc[4][rank_channels(r, 2)]
        want[r][1][7] = ps[4][rank_heads(r, 2)]
    for i in range(2):
        copy_by_rank_pair([src.tensors[i]], [4], [x.tensors[i] for x in dst], [7])
    for r, (c, s, _) in enumerate(dec):
        np.testing.assert_array_equal(c, want[r][0])
        np.testing.assert_array_equal(s, want[r][1])


def test_sglang_tensor_names_are_checked():
    with pytest.raises(LayoutError, match=r"SGLang Mamba tensor 'layer0.state' must be named '<layer>.conv' or"):
        GdnParser().parse(sglang_rank(1, 2, 0, names=("layer0.conv", "layer0.state"))[2])
