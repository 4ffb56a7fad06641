"""The plan compiler against NumPy indexing with per-(token, head) meaning, over layouts and TP pairs.

A "global" cache ``G[block, head, token, bytes]`` is split over prefill ranks by heads (vLLM's
split; replicas when TP > heads). After every decode rank has pulled from its sources, it must
hold ``G[sb, its heads]`` in blocks ``db``, and nothing else may change.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import Dim
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.layout import tensor_layout_from_regions
from llumnix_kv_core.plan import check_tp
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.plan import tp_expected_pulls
from llumnix_kv_core.plan import tp_sources
from llumnix_kv_core.testing.layouts import copy_between_ranks
from llumnix_kv_core.testing.layouts import heads_of_rank

ORDERS = ("LBNHC", "LBHNC", "LHBNC")
TP_PAIRS = [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (1, 4), (8, 2)]


class Rank:
    """One rank's cache tensor: an int8 pool, its [B, H, N, bytes] view, its layout."""

    def __init__(self, order: str, b: int, h: int, n: int, cb: int, heads: int, pad: int, seed: int) -> None:
        if order == "LBNHC":
            sb, sh, sn = n * h * cb + pad, cb, h * cb
        elif order == "LBHNC":
            sb, sh, sn = h * n * cb + pad, n * cb, cb
        else:  # LHBNC: heads outermost
            sb, sh, sn = n * cb, b * n * cb + pad, cb
        size = (b - 1) * sb + (h - 1) * sh + (n - 1) * sn + cb + pad
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=size, dtype=np.int8)
        self.shape, self.strides = (b, h, n, cb), (sb, sh, sn, 1)
        d = TensorDescription("layer", self.pool.ctypes.data, (b, h, n, cb // 2), (sb, sh, sn, 2), 2)
        self.layout = tensor_layout_from_bhnc(d, Shard("H", (heads,)))

    def view(self, pool=None):
        return as_strided(self.pool if pool is None else pool, shape=self.shape, strides=self.strides)


def run(src_order, dst_order, tp_p, tp_d, heads, n, cb, nb_p, nb_d, sb, db, pads=(0, 0), seed=0):
    g = np.random.default_rng(seed).integers(-128, 128, size=(nb_p, heads, n, cb), dtype=np.int8)
    p = [Rank(src_order, nb_p, max(heads // tp_p, 1), n, cb, heads, pads[0], seed + r) for r in range(tp_p)]
    d = [Rank(dst_order, nb_d, max(heads // tp_d, 1), n, cb, heads, pads[1], seed + 50 + r) for r in range(tp_d)]
    for r, x in enumerate(p):
        x.view()[:] = g[:, heads_of_rank(r, tp_p, heads)]
    want = []
    for r, x in enumerate(d):
        w = x.pool.copy()
        x.view(w)[np.asarray(db, dtype=np.int64)] = g[np.asarray(sb, dtype=np.int64)][:, heads_of_rank(r, tp_d, heads)]
        want.append(w)
    before = [x.pool.copy() for x in p]
    segs = copy_between_ranks([x.layout for x in p], sb, [x.layout for x in d], db)
    for r, x in enumerate(d):
        np.testing.assert_array_equal(x.pool, want[r], err_msg=f"decode rank {r}")
    for x, b in zip(p, before):
        np.testing.assert_array_equal(x.pool, b)
    return segs


@pytest.mark.parametrize(("tp_p", "tp_d"), TP_PAIRS)
@pytest.mark.parametrize("src_order", ORDERS)
@pytest.mark.parametrize("dst_order", ORDERS)
def test_every_order_pair_and_tp_pair(src_order, dst_order, tp_p, tp_d):
    run(src_order, dst_order, tp_p, tp_d, 8, 4, 12, 7, 9, [0, 1, 2, 6, 6], [3, 4, 5, 0, 8], seed=tp_p + 3 * tp_d)


def test_equal_layouts_give_one_segment_per_run_of_blocks():
    assert run("LBNHC", "LBNHC", 1, 1, 4, 16, 64, 40, 40, list(range(10, 30)), list(range(0, 20))) == [1]
    assert run("LBNHC", "LBNHC", 1, 1, 4, 16, 64, 40, 40, [1, 5, 9], [2, 3, 4]) == [3]
    # padded pages: one segment per block
    assert run("LBHNC", "LBHNC", 1, 1, 4, 16, 64, 8, 8, [1, 2, 3], [4, 5, 6], pads=(8, 8)) == [3]


def test_head_slice_segments():
    # token-major: one segment per (source rank, block, token); head-major: per (source rank, block)
    assert run("LBNHC", "LBNHC", 2, 1, 4, 16, 64, 8, 8, [1, 2], [3, 4]) == [2 * 2 * 16]
    assert run("LBHNC", "LBHNC", 2, 1, 4, 16, 64, 8, 8, [1, 2], [3, 4]) == [2 * 2]
    # one prefill rank to two decode ranks: each takes its half of every token row
    assert run("LBNHC", "LBNHC", 1, 2, 4, 16, 64, 8, 8, [1, 2], [3, 4]) == [2 * 16, 2 * 16]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_property(data):
    so, do = data.draw(st.sampled_from(ORDERS)), data.draw(st.sampled_from(ORDERS))
    tp_p, tp_d = data.draw(st.sampled_from(TP_PAIRS))
    heads = data.draw(st.sampled_from([1, 2, 4, 8]))
    n, cb = data.draw(st.integers(1, 6)), 2 * data.draw(st.integers(1, 6))
    nb_p, nb_d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    k = data.draw(st.integers(0, min(nb_p, nb_d)))
    db = data.draw(st.permutations(range(nb_d)))[:k]
    sb = data.draw(st.lists(st.integers(0, nb_p - 1), min_size=k, max_size=k))
    pads = (data.draw(st.sampled_from([0, 8, 14])), data.draw(st.sampled_from([0, 8, 14])))
    run(so, do, tp_p, tp_d, heads, n, cb, nb_p, nb_d, sb, db, pads, seed=data.draw(st.integers(0, 999)))


def test_tp_mapping():
    assert tp_sources(0, 1, 4) == [0, 1, 2, 3]
    assert tp_sources(1, 2, 4) == [2, 3]
    assert tp_sources(3, 4, 2) == [1]
    assert [tp_expected_pulls(r, 2, 4) for r in range(2)] == [2, 2]
    assert tp_expected_pulls(3, 4, 2) == 1
    with pytest.raises(IncompatiblePeerError, match=r"prefill=3 decode=2 are not supported"):
        check_tp(3, 2)
    with pytest.raises(IncompatiblePeerError, match=r"prefill=2 decode=3"):
        tp_sources(0, 3, 2)


def test_grouped_shard_moves_each_group_slice():
    """A dim made of channel groups [A | B] (GDN's Q|K|V): rank r holds its slice of each group."""
    def rank(tp, r, seed):
        a, b = 8 // tp, 4 // tp
        pool = np.random.default_rng(seed).integers(-128, 128, size=3 * (a + b) * 2, dtype=np.int8)
        reg = Region("x", 0, 2, (Dim("D", a + b, 2),), Shard("D", (8, 4)))
        return pool, tensor_layout_from_regions("t", pool.ctypes.data, 3, (a + b) * 2, [reg])

    glob = np.arange(12 * 2, dtype=np.int8).reshape(12, 2)  # channels 0-7 group A, 8-11 group B
    p = [rank(2, r, r) for r in range(2)]
    for r, (pool, _) in enumerate(p):
        chans = list(range(r * 4, r * 4 + 4)) + list(range(8 + r * 2, 8 + r * 2 + 2))
        pool.reshape(3, 6, 2)[1] = glob[chans]
    d = rank(1, 0, 9)
    copy_between_ranks([x[1] for x in p], [1], [d[1]], [2])
    np.testing.assert_array_equal(d[0].reshape(3, 12, 2)[2], glob)


def test_mismatches_are_refused_with_both_values():
    a = Rank("LBNHC", 4, 2, 4, 8, 2, 0, 1).layout
    b = Rank("LBNHC", 4, 2, 8, 8, 2, 0, 2).layout  # 8 tokens per block
    with pytest.raises(IncompatiblePeerError, match=r"dim N has 4 elements on the source and 8 on the destination"):
        compile_template(a, b)
    c = tensor_layout_from_regions("layer", 0, 4, 64, [Region("latent", 0, 2, (Dim("N", 4, 16), Dim("C", 8, 2)))])
    with pytest.raises(IncompatiblePeerError, match=r"source block regions \['kv'\], destination block regions"):
        compile_template(a, c)
    with pytest.raises(LayoutError, match=r"source block id out of range"):
        plan_tensor(compile_template(a, a), a, [4], a, [0])


# -- native (C++) per-request stage vs the NumPy path ------------------------------------------------

@pytest.mark.skipif(__import__("llumnix_kv_core.plan", fromlist=["x"]).implementation != "native",
                    reason="llumnix_kv_core._native (with plan_segments) is not built")
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_native_plan_equals_numpy(data):
    import llumnix_kv_core.plan as plan_mod

    so, do = data.draw(st.sampled_from(ORDERS)), data.draw(st.sampled_from(ORDERS))
    tp_p, tp_d = data.draw(st.sampled_from(TP_PAIRS))
    heads = data.draw(st.sampled_from([1, 2, 4, 8]))
    pads = (data.draw(st.sampled_from([0, 8])), data.draw(st.sampled_from([0, 8])))
    p = Rank(so, 12, max(heads // tp_p, 1), 4, 8, heads, pads[0], 1).layout
    d = Rank(do, 12, max(heads // tp_d, 1), 4, 8, heads, pads[1], 2).layout
    k = data.draw(st.integers(0, 12))
    sb = np.asarray(data.draw(st.lists(st.integers(0, 11), min_size=k, max_size=k)), dtype=np.int64)
    db = np.asarray(data.draw(st.permutations(range(12)))[:k], dtype=np.int64)
    src_rank = data.draw(st.sampled_from(tp_sources(0, tp_d, tp_p)))
    tpl = compile_template(p, d, src_rank, tp_p, 0, tp_d)
    native = plan_tensor(tpl, p, sb, d, db)
    ref = plan_mod.plan_tensor_numpy(tpl, p, sb, d, db) if len(tpl) and k else native
    for a, b in ((native.src_offsets, ref.src_offsets), (native.dst_offsets, ref.dst_offsets),
                 (native.lengths, ref.lengths)):
        assert a.dtype == np.uint64
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(__import__("llumnix_kv_core.plan", fromlist=["x"]).implementation != "native",
                    reason="llumnix_kv_core._native (with plan_segments) is not built")
def test_native_plan_checks_block_ids():
    a = Rank("LBNHC", 4, 2, 4, 8, 2, 0, 1).layout
    with pytest.raises(LayoutError, match=r"destination block id out of range"):
        plan_tensor(compile_template(a, a), a, [0], a, [7])
    import llumnix_kv_core._native as nat

    with pytest.raises(ValueError, match=r"source block id 9 at index 1 is out of range \[0, 4\)"):
        nat.plan_segments(np.array([0, 9]), np.array([0, 1]), 64, 64, 4, 4, np.array([0]), np.array([0]),
                          np.array([64]))
