"""gdn against vLLM 0.32's own MambaSpec pages, byte for byte, over TP pairs and conv layouts SD/DS.

Pages are allocated with ``create_kv_cache_views`` for a real ``MambaSpec`` (GDN_ATTN, padded
like a hybrid model's), and read back the way ``MambaBase.bind_kv_cache`` slices them. The
prefill ranks hold their TP slices of one global state: conv ``(state_len, Q|K|V)`` with each of
Q, K, V split over TP on its own, temporal ``(value heads, v, k)`` split by value heads.
"""

from __future__ import annotations

from math import prod

import pytest

pytestmark = pytest.mark.vllm

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv_layout_gdn.parser import GdnParser  # noqa: E402

from llumnix_kv_core.errors import LayoutError  # noqa: E402
from llumnix_kv_core.layout import MOVES_LAST_STATE  # noqa: E402
from llumnix_kv_core.layout import check_compatible  # noqa: E402
from llumnix_kv_core.testing.layouts import copy_between_ranks  # noqa: E402
from llumnix_kv_core.testing.layouts import vllm_group  # noqa: E402

LAYERS = ["model.layers.0.linear_attn", "model.layers.1.linear_attn"]
NK, NV, HK, HV, KERNEL = 2, 4, 16, 8, 4  # key heads, value heads, head dims, conv kernel
KEY, VALUE = NK * HK, NV * HV


def build(tp: int, layout: str, slots: int, seed: int, ssm_dtype=torch.float32):
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import MambaSpec

    conv_dim = (2 * KEY + VALUE) // tp
    conv = (conv_dim, KERNEL - 1) if layout == "DS" else (KERNEL - 1, conv_dim)
    shapes = (conv, (NV // tp, HV, HK))
    dtypes = (torch.bfloat16, ssm_dtype)
    real = sum(prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, dtypes))
    spec = MambaSpec(block_size=256, shapes=shapes, dtypes=dtypes, page_size_padded=real + 96,
                     mamba_type=MambaAttentionBackendEnum.GDN_ATTN)
    extra = {"tp_size": tp, "shapes": [list(s) for s in shapes], "itemsizes": [2, dtypes[1].itemsize],
             "dtypes": "bf16,fp32", "mamba_type": "GDN_ATTN", "conv_layout": layout}
    return [vllm_group(spec, LAYERS, slots, "LBNHC", kind="mamba", backend="GDN_ATTN", extra=extra,
                       seed=seed * 10 + r) for r in range(tp)], shapes, dtypes


def states(group, name, shapes, dtypes, pool=None):
    """The layer's states as vLLM's MambaBase.bind_kv_cache makes them (over ``pool``, default its own)."""
    v = group.views[name]
    if pool is not None:
        v = torch.as_strided(pool, v.shape, v.stride(), v.data_ptr() - group.pool.data_ptr())
    pages = v.squeeze(1).squeeze(1)
    out, off = [], 0
    for shape, dt in zip(shapes, dtypes):
        n = prod(shape) * torch.empty((), dtype=dt).element_size()
        out.append(pages[:, off:off + n].view(dt).view(-1, *shape))
        off += n
    return out


def rank_channels(rank: int, tp: int) -> list[int]:
    """Global conv channels (Q|K|V) rank ``rank`` holds, in its local order."""
    k, v = KEY // tp, VALUE // tp
    return ([*range(rank * k, rank * k + k)] + [KEY + c for c in range(rank * k, rank * k + k)]
            + [2 * KEY + c for c in range(rank * v, rank * v + v)])


def fill(conv, ssm, layout, glob_conv, glob_ssm, slots, rank, tp):
    ch = rank_channels(rank, tp)
    heads = list(range(rank * NV // tp, (rank + 1) * NV // tp))
    c = glob_conv[slots][:, :, ch]  # [slots, S, local D]
    conv[...] = c.transpose(1, 2) if layout == "DS" else c
    ssm[...] = glob_ssm[slots][:, heads]


@pytest.mark.parametrize(("tp_p", "tp_d"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize(("lp", "ld"), [("SD", "SD"), ("DS", "DS"), ("SD", "DS"), ("DS", "SD")])
def test_last_state_moves_byte_exact(tp_p, tp_d, lp, ld):
    slots_p, slots_d = 5, 6
    p, p_shapes, dtypes = build(tp_p, lp, slots_p, seed=1)
    d, d_shapes, _ = build(tp_d, ld, slots_d, seed=2)
    g = torch.Generator().manual_seed(tp_p * 31 + tp_d)
    glob_conv = torch.randn((len(LAYERS), slots_p, KERNEL - 1, 2 * KEY + VALUE), generator=g).to(torch.bfloat16)
    glob_ssm = torch.randn((len(LAYERS), slots_p, NV, HV, HK), generator=g)
    for r, grp in enumerate(p):
        for i, name in enumerate(LAYERS):
            conv, ssm = states(grp, name, p_shapes, dtypes)
            fill(conv, ssm, lp, glob_conv[i], glob_ssm[i], list(range(slots_p)), r, tp_p)
    sb, db = [3], [5]  # the request's last valid state slot on each side
    expected = []
    for r, grp in enumerate(d):
        want = grp.pool.clone()
        for i, name in enumerate(LAYERS):
            conv, ssm = states(grp, name, d_shapes, dtypes, want)
            ch = rank_channels(r, tp_d)
            heads = list(range(r * NV // tp_d, (r + 1) * NV // tp_d))
            c = glob_conv[i][sb][:, :, ch]
            conv[db] = c.transpose(1, 2) if ld == "DS" else c
            ssm[db] = glob_ssm[i][sb][:, heads]
        expected.append(want)
    src = [GdnParser().parse(x.desc) for x in p]
    dst = [GdnParser().parse(x.desc) for x in d]
    assert src[0].moves == MOVES_LAST_STATE
    check_compatible(src[0].signature, dst[0].signature)  # TP size and conv layout are not in it
    for i in range(len(LAYERS)):
        segs = copy_between_ranks([s.tensors[i] for s in src], sb, [x.tensors[i] for x in dst], db)
        if tp_p == tp_d and lp == ld:
            assert segs == [1] * tp_d  # one state page, conv + temporal, is one segment
    for r, grp in enumerate(d):
        assert torch.equal(grp.pool, expected[r]), f"decode rank {r}"


def test_regions_follow_the_qkv_split():
    (p,), _, _ = build(1, "DS", 2, seed=3)
    lay = GdnParser().parse(p.desc)
    conv, ssm = lay.tensors[0].regions
    assert conv.shard.groups == (KEY, KEY, VALUE)
    assert [d.name for d in conv.dims] == ["D", "S"]
    assert ssm.offset == (2 * KEY + VALUE) * (KERNEL - 1) * 2
    assert ssm.shard.groups == (NV,)
    assert lay.tensors[0].block_stride == ssm.offset + NV * HV * HK * 4 + 96  # the padded page


def test_declines_and_refuses():
    (p,), _, _ = build(1, "SD", 2, seed=4)
    from dataclasses import replace

    assert GdnParser().parse(replace(p.desc, extra={**p.desc.extra, "mamba_type": "MAMBA2"})) is None
    assert GdnParser().parse(replace(p.desc, kind="attention")) is None
    with pytest.raises(LayoutError, match=r"does not split into Q\|K\|V"):
        GdnParser().parse(replace(p.desc, extra={**p.desc.extra, "shapes": [[3, 7], [4, 8, 16]]}))


def test_sglang_mamba_pool():
    """SGLang's MambaPool: [slots, conv_dim/tp, K-1] and [slots, heads/tp, v, k] per layer, one slot a block."""
    from llumnix_kv_core.layout import CacheGroupDescription
    from llumnix_kv_core.layout import TensorDescription

    def pool(tp, seed):
        conv = torch.randn((9, (2 * KEY + VALUE) // tp, KERNEL - 1), generator=torch.Generator().manual_seed(seed))
        conv = conv.to(torch.bfloat16)
        ssm = torch.randn((9, NV // tp, HV, HK), generator=torch.Generator().manual_seed(seed + 1))
        tensors = tuple(TensorDescription(f"layer0.{n}", t.data_ptr(), tuple(t.shape),
                                          tuple(s * t.element_size() for s in t.stride()), t.element_size())
                        for n, t in (("conv", conv), ("ssm", ssm)))
        extra = {"tp_size": tp, "shapes": [list(conv.shape[1:]), list(ssm.shape[1:])], "itemsizes": [2, 4],
                 "mamba_type": "gdn_attn"}
        return conv, ssm, CacheGroupDescription("sglang", 1, "mamba", "MambaPool", "", 1, "bf16", tensors, extra)

    pc, ps, pd = pool(1, 1)
    dcs = [pool(2, 10 + r) for r in range(2)]
    src = GdnParser().parse(pd)
    dst = [GdnParser().parse(x[2]) for x in dcs]
    for i in range(2):
        copy_between_ranks([src.tensors[i]], [4], [d.tensors[i] for d in dst], [7])
    for r, (conv, ssm, _) in enumerate(dcs):
        assert torch.equal(conv[7], pc[4][torch.tensor(rank_channels(r, 2))])
        assert torch.equal(ssm[7], ps[4][r * NV // 2:(r + 1) * NV // 2])
