"""Layouts and the plan compiler, checked against NumPy indexing of real strided views.

A cache tensor is a ``[B, H, N, C]`` view (blocks, heads, tokens, content bytes) into an int8
pool; its memory order is one of:

* ``LBNHC``: per block, token-major then head (vLLM's default),
* ``LBHNC``: per block, head-major then token,
* ``LHBNC``: heads outermost, so one block is ``H`` separate pieces.

``dst[db] = src[sb]`` done by NumPy indexing is the meaning a plan must reproduce byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core import native
from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import check_compatible
from llumnix_kv_core.layout import plan_blocks
from llumnix_kv_core.layout import signature_hash
from llumnix_kv_core.layout import strided_units
from llumnix_kv_core.layout import tensor_layout_from_bhnc

ORDERS = ("LBNHC", "LBHNC", "LHBNC")


def bhnc_strides(order: str, b: int, h: int, n: int, cb: int, pad: int = 0) -> tuple[int, int, int]:
    """Byte strides of B, H, N for a memory order; ``pad`` bytes after every block (or head plane)."""
    if order == "LBNHC":
        return n * h * cb + pad, cb, h * cb
    if order == "LBHNC":
        return h * n * cb + pad, n * cb, cb
    if order == "LHBNC":
        return n * cb, b * n * cb + pad, cb
    raise AssertionError(order)


class Cache:
    """One cache tensor: an int8 pool, its ``[B, H, N, C]`` byte view and its TensorLayout."""

    def __init__(self, order: str, b: int, h: int, n: int, c: int, itemsize: int = 2, pad: int = 0,
                 seed: int = 0) -> None:
        cb = c * itemsize
        sb, sh, sn = bhnc_strides(order, b, h, n, cb, pad)
        size = (b - 1) * sb + (h - 1) * sh + (n - 1) * sn + cb + pad
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=size, dtype=np.int8)
        self.strides = (sb, sh, sn, 1)
        self.shape = (b, h, n, cb)
        self.desc = TensorDescription("layer.0", self.pool.ctypes.data, (b, h, n, c), (sb, sh, sn, itemsize),
                                      itemsize)
        self.layout = tensor_layout_from_bhnc(self.desc)

    def view(self, pool: np.ndarray | None = None) -> np.ndarray:
        return as_strided(self.pool if pool is None else pool, shape=self.shape, strides=self.strides)


def copy_plan(src: Cache, sb, dst: Cache, db) -> int:
    """Run plan_blocks + native.copy_segments; returns the number of segments."""
    plan = plan_blocks(src.layout, sb, dst.layout, db)
    native.copy_segments(plan.src_offsets + np.uint64(src.pool.ctypes.data),
                         plan.dst_offsets + np.uint64(dst.pool.ctypes.data), plan.lengths)
    assert plan.nbytes == len(sb) * src.layout.page_bytes
    return len(plan.lengths)


def check_copy(src: Cache, sb, dst: Cache, db) -> int:
    expected = dst.pool.copy()
    dst.view(expected)[np.asarray(db, dtype=np.int64)] = src.view()[np.asarray(sb, dtype=np.int64)]
    before_src = src.pool.copy()
    n = copy_plan(src, sb, dst, db)
    np.testing.assert_array_equal(dst.pool, expected)  # the blocks, and not one byte elsewhere
    np.testing.assert_array_equal(src.pool, before_src)
    return n


# -- strided_units / tensor_layout_from_bhnc -------------------------------------------------------

@pytest.mark.parametrize(
    ("order", "offsets", "unit"),
    [
        ("LBNHC", (0,), 4 * 3 * 8),  # one contiguous page
        ("LBHNC", (0,), 3 * 4 * 8),
        ("LHBNC", (0, 5 * 4 * 8, 2 * 5 * 4 * 8), 4 * 8),  # one unit per head, a head plane apart
    ],
)
def test_strided_units_per_order(order, offsets, unit):
    b, h, n, cb = 5, 3, 4, 8
    sb, sh, sn = bhnc_strides(order, b, h, n, cb)
    assert strided_units((h, n), (sh, sn), cb) == (offsets, unit)
    t = tensor_layout_from_bhnc(TensorDescription("x", 4096, (b, h, n, cb // 2), (sb, sh, sn, 2), 2))
    assert (t.unit_offsets, t.unit_bytes, t.block_stride) == (offsets, unit, sb)
    assert t.logical == (h, n, cb)
    assert t.page_bytes == h * n * cb
    assert t.extent == (b - 1) * sb + offsets[-1] + unit
    assert t.geometry() == ((h, n, cb), "NH" if order == "LBNHC" else "HN", unit, len(offsets))


def test_strided_units_gaps_and_unit_dims():
    # token rows padded to 40 bytes (32 used): heads merge, tokens do not
    assert strided_units((4, 3), (8, 40), 8) == ((0, 40, 80), 32)
    # head planes padded: tokens merge into 24-byte units, one per head
    assert strided_units((2, 3), (32, 8), 8) == ((0, 32), 24)
    # nothing contiguous: every (head, token) cell is a unit, listed head-major (logical order)
    assert strided_units((2, 2), (100, 10), 4) == ((0, 10, 100, 110), 4)
    # dims of size one merge whatever their stride
    assert strided_units((1, 5), (12345, 8), 8) == ((0,), 40)
    assert strided_units((3, 1), (8, 999), 8) == ((0,), 24)


def test_tensor_layout_errors():
    with pytest.raises(LayoutError, match=r"'k'.*\[blocks, heads, tokens, content\]"):
        tensor_layout_from_bhnc(TensorDescription("k", 0, (4, 2, 16), (64, 32, 2), 2))
    with pytest.raises(LayoutError, match=r"content dim has stride 4 bytes, not 2"):
        tensor_layout_from_bhnc(TensorDescription("k", 0, (4, 2, 16, 8), (512, 256, 16, 4), 2))
    empty = tensor_layout_from_bhnc(TensorDescription("k", 0, (0, 2, 16, 8), (512, 256, 16, 2), 2))
    assert (empty.num_blocks, empty.extent) == (0, 0)


# -- plan_blocks against NumPy indexing ---------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("pad", [0, 24])
def test_plan_matches_indexing(order, pad):
    rng = np.random.default_rng(3)
    src = Cache(order, 40, 4, 16, 8, pad=pad, seed=1)
    dst = Cache(order, 33, 4, 16, 8, pad=pad + 8, seed=2)
    for _ in range(5):
        k = int(rng.integers(1, 20))
        db = rng.choice(33, size=k, replace=False).tolist()
        sb = rng.integers(0, 40, size=k).tolist()  # a source block may be sent to several places
        check_copy(src, sb, dst, db)


@pytest.mark.parametrize("order", ["LBNHC", "LBHNC"])
def test_consecutive_blocks_coalesce_to_one_segment_per_run(order):
    src = Cache(order, 64, 4, 16, 8, seed=1)
    dst = Cache(order, 64, 4, 16, 8, seed=2)
    # runs consecutive on both sides: [10..14]->[40..44], [30..32]->[0..2], [50]->[60], [51]->[20]
    sb = [10, 11, 12, 13, 14, 30, 31, 32, 50, 51]
    db = [40, 41, 42, 43, 44, 0, 1, 2, 60, 20]
    assert check_copy(src, sb, dst, db) == 4
    # a single run of the whole cache is a single segment
    assert check_copy(src, list(range(64)), dst, list(range(64))) == 1


def test_padded_blocks_do_not_coalesce():
    src = Cache("LBNHC", 16, 2, 4, 8, pad=16, seed=1)
    dst = Cache("LBNHC", 16, 2, 4, 8, pad=16, seed=2)
    assert check_copy(src, [1, 2, 3], dst, [4, 5, 6]) == 3


def test_per_head_layout_segments():
    src = Cache("LHBNC", 16, 4, 8, 8, seed=1)
    dst = Cache("LHBNC", 16, 4, 8, 8, seed=2)
    assert check_copy(src, [5, 6, 7], dst, [0, 1, 2]) <= 3 * 4


def run_lengths(sb: list[int], db: list[int]) -> int:
    return 1 + sum(1 for i in range(1, len(sb)) if not (sb[i] == sb[i - 1] + 1 and db[i] == db[i - 1] + 1))


@st.composite
def plan_case(draw):
    h = draw(st.integers(1, 4))
    n = draw(st.integers(1, 8))
    c = draw(st.integers(1, 6))
    itemsize = draw(st.sampled_from([1, 2, 4]))
    order = draw(st.sampled_from(ORDERS))
    bs, bd = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    k = draw(st.integers(0, min(bs, bd)))
    db = draw(st.permutations(range(bd)))[:k]
    sb = draw(st.lists(st.integers(0, bs - 1), min_size=k, max_size=k))
    pads = draw(st.tuples(st.sampled_from([0, 8, 13]), st.sampled_from([0, 8, 13])))
    seed = draw(st.integers(0, 2**16))
    return h, n, c, itemsize, order, bs, bd, sb, db, pads, seed


@settings(max_examples=150, deadline=None)
@given(plan_case())
def test_plan_property(case):
    h, n, c, itemsize, order, bs, bd, sb, db, (ps, pd), seed = case
    src = Cache(order, bs, h, n, c, itemsize, pad=ps, seed=seed)
    dst = Cache(order, bd, h, n, c, itemsize, pad=pd, seed=seed + 1)
    if src.layout.geometry() != dst.layout.geometry():
        # Same order, but padding made one side's units merge where the other's do not (e.g. a
        # one-block LHBNC pool): refusing is allowed, copying wrongly is not.
        assert (ps, pd) != (0, 0) or bs != bd
        with pytest.raises(IncompatiblePeerError):
            plan_blocks(src.layout, sb, dst.layout, db)
        return
    segments = check_copy(src, sb, dst, db)
    units = len(src.layout.unit_offsets)
    assert segments <= len(sb) * units
    if sb and order != "LHBNC" and ps == pd == 0:
        assert segments == run_lengths(sb, db)


@pytest.mark.parametrize(
    ("src_order", "dst_order"),
    [("LBNHC", "LBHNC"), ("LBHNC", "LBNHC"), ("LBNHC", "LHBNC"), ("LHBNC", "LBHNC")],
)
def test_cross_layout_plan_is_refused_or_correct(src_order, dst_order):
    src = Cache(src_order, 8, 2, 4, 8, seed=1)
    dst = Cache(dst_order, 8, 2, 4, 8, seed=2)
    if src.layout.geometry() != dst.layout.geometry():
        with pytest.raises(IncompatiblePeerError, match=r"block geometry differs"):
            plan_blocks(src.layout, [1, 2], dst.layout, [5, 6])
    else:  # accepted: then the copy must keep every (block, head, token) cell's meaning
        check_copy(src, [1, 2], dst, [5, 6])


def test_plan_errors():
    a = Cache("LBNHC", 8, 2, 4, 8)
    with pytest.raises(LayoutError, match=r"2 source blocks but 1 destination blocks"):
        plan_blocks(a.layout, [0, 1], a.layout, [0])
    with pytest.raises(LayoutError, match=r"source block id out of range \[0, 8\) for layer 'layer.0'"):
        plan_blocks(a.layout, [8], a.layout, [0])
    with pytest.raises(LayoutError, match=r"destination block id out of range"):
        plan_blocks(a.layout, [0], a.layout, [-1])
    other = Cache("LBNHC", 8, 2, 4, 16)
    with pytest.raises(IncompatiblePeerError, match=r"layer 'layer.0': block geometry differs \(source "
                                                    r"\(\(2, 4, 16\), 'NH', 128, 1\), destination \(\(2, 4, 32\)"):
        plan_blocks(a.layout, [0], other.layout, [0])
    empty = plan_blocks(a.layout, [], a.layout, [])
    assert (len(empty.lengths), empty.nbytes) == (0, 0)


def test_plan_offsets_are_relative_to_tensor_addr():
    t = TensorLayout("x", addr=10**9, num_blocks=4, block_stride=100, unit_offsets=(0,), unit_bytes=64,
                     extent=364, logical=(1, 1, 64))
    u = TensorLayout("x", addr=0, num_blocks=4, block_stride=64, unit_offsets=(0,), unit_bytes=64,
                     extent=256, logical=(1, 1, 64))
    plan = plan_blocks(t, [3, 0], u, [1, 2])
    assert plan.src_offsets.tolist() == [300, 0]
    assert plan.dst_offsets.tolist() == [64, 128]
    assert plan.lengths.tolist() == [64, 64]
    assert plan.src_offsets.dtype == plan.dst_offsets.dtype == plan.lengths.dtype == np.uint64


# -- signatures ----------------------------------------------------------------------------------

def test_check_compatible_names_every_difference():
    here = {"model": "m", "dtype": "bfloat16", "block_size": 16, "layout": "LBNHC", "tp": 1}
    peer = {"model": "m", "dtype": "float16", "block_size": 32, "layout": "LBNHC", "pp": 2}
    with pytest.raises(IncompatiblePeerError) as info:
        check_compatible(here, peer)
    msg = str(info.value)
    for field in ("dtype: here='bfloat16' peer='float16'", "block_size: here=16 peer=32",
                  "pp: here=None peer=2", "tp: here=1 peer=None"):
        assert field in msg
    assert "model:" not in msg
    assert "layout:" not in msg
    assert msg.startswith("KV cache of the two instances differ")
    with pytest.raises(IncompatiblePeerError, match=r"^layer table of the two"):
        check_compatible({"a": 1}, {"a": 2}, what="layer table")
    with pytest.raises(IncompatiblePeerError, match=r"dtype: sender='bfloat16' receiver='float16'"):
        check_compatible(here, peer, sides=("sender", "receiver"))
    check_compatible(here, dict(here))
    check_compatible({}, {})


def test_signature_hash():
    a = {"model": "m", "groups": [{"page": [[2, 16, 256]], "layout": "LBNHC"}], "tp": 1}
    b = {"tp": 1, "groups": [{"layout": "LBNHC", "page": [[2, 16, 256]]}], "model": "m"}
    assert signature_hash(a) == signature_hash(b)
    assert len(signature_hash(a)) == 16
    assert signature_hash(a) != signature_hash({**a, "tp": 2})
    assert signature_hash(a) != signature_hash({**a, "groups": [{"page": [[2, 16, 256]], "layout": "LBHNC"}]})
