"""The plan compiler: (source layout, blocks, destination layout, blocks, TP mapping) -> coalesced segments.

Compilation has two stages:

1. :func:`compile_template`, once per pair of tensor geometries and TP ranks: which bytes
   of one source block go where in one destination block. Each region of the source is
   matched by name with the destination's; the slice of the sharded dim both ranks hold
   (heads, Q|K|V channel groups, value heads) is intersected in global coordinates; the
   dims are then merged innermost-first while they are contiguous on *both* sides, so a
   copy between equal layouts is one run per block and a head slice of a token-major page
   is one run per token. Dims in a different memory order on the two sides (NHD vs HND,
   conv state SD vs DS) become one run per element group: the permutation happens during
   the copy.
2. :func:`plan_tensor`, per request: the template broadcast over the block pairs, then
   adjacent runs merged across blocks. This runs in C++ (``llumnix_kv_core._native.plan_segments``)
   when the native module is built, else in NumPy (no Python loop per block or token); both give
   the same segments. ``LLUMNIX_KV_NATIVE=0`` forces NumPy.

Tensor parallelism (one dim divides the other, see :func:`tp_sources`): decode rank ``d``
pulls from the prefill ranks ``tp_sources(d)``; of data held by several of them
(replicated MLA latents, KV heads replicated because TP > heads) only the first of those
sends, the others contribute nothing for that region.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import SegmentPlan
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import _coalesce

__all__ = [
    "Template",
    "check_tp",
    "compile_template",
    "plan_tensor",
    "tp_expected_pulls",
    "tp_sources",
]


# -- tensor-parallel mapping ------------------------------------------------------------------------

def check_tp(src_tp: int, dst_tp: int) -> None:
    """Raise IncompatiblePeerError unless one TP size divides the other."""
    if src_tp < 1 or dst_tp < 1 or (src_tp % dst_tp and dst_tp % src_tp):
        msg = (
            f"tensor-parallel sizes prefill={src_tp} decode={dst_tp} are not supported: one must divide the "
            "other (e.g. 4 -> 2, 2 -> 4, 2 -> 2)"
        )
        raise IncompatiblePeerError(msg)


def tp_sources(dst_rank: int, dst_tp: int, src_tp: int) -> list[int]:
    """Source ranks decode rank ``dst_rank`` pulls from (each source is pulled by at least one rank)."""
    check_tp(src_tp, dst_tp)
    if src_tp >= dst_tp:
        k = src_tp // dst_tp
        return list(range(dst_rank * k, (dst_rank + 1) * k))
    return [dst_rank // (dst_tp // src_tp)]


def tp_expected_pulls(src_rank: int, src_tp: int, dst_tp: int) -> int:
    """How many decode ranks pull one transfer from source rank ``src_rank``."""
    check_tp(src_tp, dst_tp)
    return 1 if src_tp >= dst_tp else dst_tp // src_tp


@dataclass(frozen=True)
class _Piece:
    global_start: int
    local_start: int
    count: int
    replicas: int  # >1: this slice is held by that many consecutive ranks


def _local_pieces(shard: Shard, local_size: int, rank: int, tp: int, side: str, region: str) -> list[_Piece]:
    pieces, local = [], 0
    for g in shard.groups:
        if g % tp == 0:
            per = g // tp
            pieces.append(_Piece(rank * per, local, per, 1))
            local += per
        elif tp % g == 0:
            rep = tp // g
            pieces.append(_Piece(rank // rep, local, 1, rep))
            local += 1
        else:
            msg = (f"region {region!r}: {side} TP size {tp} does not divide (and is not a multiple of) the "
                   f"{shard.dim} group of {g}")
            raise IncompatiblePeerError(msg)
    if local != local_size:
        msg = (f"region {region!r}: {side} holds {local_size} of dim {shard.dim}, but groups {shard.groups} over "
               f"TP {tp} give {local}; the layout parser's shard description is wrong")
        raise LayoutError(msg)
    return pieces


# -- templates --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """Where the bytes of one source block go in one destination block (offsets within the blocks)."""

    src_offsets: np.ndarray
    dst_offsets: np.ndarray
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.lengths)


def _strided_offsets(base: int, counts: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    out = np.full(1, base, dtype=np.int64)
    for n, s in zip(counts, strides):
        out = (out[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return out


def _region_pieces(src: Region, dst: Region, ranks: tuple[int, int, int, int], layer: str):
    """(src base, dst base, counts per dim name) of every slice this source rank sends this destination rank."""
    src_rank, src_tp, dst_rank, dst_tp = ranks
    sdims = {d.name: d for d in src.dims}
    ddims = {d.name: d for d in dst.dims}
    if src.itemsize != dst.itemsize or set(sdims) != set(ddims) or (src.shard is None) != (dst.shard is None) or (
            src.shard is not None and src.shard != dst.shard):
        msg = (f"layer {layer} region {src.name!r}: source has element size {src.itemsize}, dims "
               f"{[(d.name, d.size) for d in src.dims]}, shard {src.shard}; destination has element size "
               f"{dst.itemsize}, dims {[(d.name, d.size) for d in dst.dims]}, shard {dst.shard}")
        raise IncompatiblePeerError(msg)
    sharded = src.shard.dim if src.shard is not None else None
    for name, d in sdims.items():
        if name != sharded and d.size != ddims[name].size:
            msg = (f"layer {layer} region {src.name!r}: dim {name} has {d.size} elements on the source and "
                   f"{ddims[name].size} on the destination")
            raise IncompatiblePeerError(msg)
    sources = tp_sources(dst_rank, dst_tp, src_tp)
    if src.shard is None:
        if src_rank == sources[0]:
            yield src.offset, dst.offset, {n: d.size for n, d in sdims.items()}
        return
    shard = src.shard
    sp = _local_pieces(shard, sdims[sharded].size, src_rank, src_tp, "source", src.name)
    dp = _local_pieces(shard, ddims[sharded].size, dst_rank, dst_tp, "destination", src.name)
    for s, d in zip(sp, dp):
        a = max(s.global_start, d.global_start)
        b = min(s.global_start + s.count, d.global_start + d.count)
        if a >= b:
            continue
        if s.replicas > 1:  # several source ranks hold this slice: the first one in sources sends it
            holders = range(s.global_start * s.replicas, (s.global_start + 1) * s.replicas)
            chosen = [r for r in holders if r in sources]
            if not chosen:  # cannot happen when one TP size divides the other
                msg = f"region {src.name!r}: no source rank of {sources} holds {shard.dim}={s.global_start}"
                raise LayoutError(msg)
            if chosen[0] != src_rank:
                continue
        counts = {n: dd.size for n, dd in sdims.items()}
        counts[sharded] = b - a
        sb = src.offset + (s.local_start + a - s.global_start) * sdims[sharded].stride
        db = dst.offset + (d.local_start + a - d.global_start) * ddims[sharded].stride
        yield sb, db, counts


def _runs(src: Region, dst: Region, sbase: int, dbase: int, counts: dict[str, int]):
    """Contiguous runs of one slice: dims merged innermost-first while contiguous on both sides."""
    sdims = {d.name: d for d in src.dims}
    ddims = {d.name: d for d in dst.dims}
    dims = [(counts[n], sdims[n].stride, ddims[n].stride) for n in counts if counts[n] > 1]
    if any(n == 0 for n in counts.values()):
        return None
    run = src.itemsize
    merged = True
    while merged:
        merged = False
        for i, (n, ss, ds) in enumerate(dims):
            if ss == run and ds == run:
                run *= n
                dims.pop(i)
                merged = True
                break
    dims.sort(key=lambda x: (-x[2], -x[1]))  # destination memory order
    so = _strided_offsets(sbase, [d[0] for d in dims], [d[1] for d in dims])
    do = _strided_offsets(dbase, [d[0] for d in dims], [d[2] for d in dims])
    return so, do, run


def _legacy_template(src: TensorLayout, dst: TensorLayout) -> Template:
    if src.geometry() != dst.geometry():
        msg = (f"layer {src.name}: block geometry differs (source {src.geometry()}, destination "
               f"{dst.geometry()}); both sides need the same layout for a direct copy")
        raise IncompatiblePeerError(msg)
    su = np.asarray(src.unit_offsets, dtype=np.int64)
    du = np.asarray(dst.unit_offsets, dtype=np.int64)
    return Template(su, du, np.full(len(su), src.unit_bytes, dtype=np.int64))


def compile_template(src: TensorLayout, dst: TensorLayout, src_rank: int = 0, src_tp: int = 1, dst_rank: int = 0,
                     dst_tp: int = 1) -> Template:
    """Segments moving one block of ``src`` (TP rank ``src_rank`` of ``src_tp``) into one block of ``dst``.

    Raises IncompatiblePeerError (naming both sides' values) when the two layouts do not hold
    the same data, or when this TP pair is not supported.
    """
    # Cached per pair of geometries, not per layer: every layer of one geometry gets the same
    # Template object, so a sender plans a block range once for all of them.
    try:
        return _compile_cached(_key(src), _key(dst), src_rank, src_tp, dst_rank, dst_tp, _LAYER)
    except (IncompatiblePeerError, LayoutError) as exc:
        raise type(exc)(str(exc).replace(_LAYER, repr(src.name))) from None


_LAYER = "\x00layer\x00"  # stands for the layer name in messages of the shared (cached) compilation


def _key(t: TensorLayout):
    return (t.regions, t.unit_offsets, t.unit_bytes, t.logical, t.order)


@functools.lru_cache(maxsize=4096)
def _compile_cached(skey, dkey, src_rank, src_tp, dst_rank, dst_tp, name) -> Template:
    sregions, dregions = skey[0], dkey[0]
    check_tp(src_tp, dst_tp)
    if not sregions or not dregions:
        if src_tp != 1 or dst_tp != 1:
            msg = f"layer {name}: a layout without regions moves only between TP 1 instances"
            raise IncompatiblePeerError(msg)
        src = TensorLayout(name, 0, 1, 0, skey[1], skey[2], 0, skey[3], skey[4])
        dst = TensorLayout(name, 0, 1, 0, dkey[1], dkey[2], 0, dkey[3], dkey[4])
        return _legacy_template(src, dst)
    snames = sorted(r.name for r in sregions)
    dnames = sorted(r.name for r in dregions)
    if snames != dnames:
        msg = f"layer {name}: source block regions {snames}, destination block regions {dnames}"
        raise IncompatiblePeerError(msg)
    dby = {r.name: r for r in dregions}
    so, do, ln = [], [], []
    for s in sregions:
        d = dby[s.name]
        for sbase, dbase, counts in _region_pieces(s, d, (src_rank, src_tp, dst_rank, dst_tp), name):
            runs = _runs(s, d, sbase, dbase, counts)
            if runs is None:
                continue
            a, b, run = runs
            so.append(a)
            do.append(b)
            ln.append(np.full(len(a), run, dtype=np.int64))
    if not so:
        empty = np.zeros(0, dtype=np.int64)
        return Template(empty, empty, empty)
    s_all, d_all, l_all = np.concatenate(so), np.concatenate(do), np.concatenate(ln)
    order = np.argsort(d_all, kind="stable")
    s_all, d_all, l_all = _coalesce(s_all[order], d_all[order], l_all[order])
    if len(d_all) > 1 and (d_all[1:] < d_all[:-1] + l_all[:-1]).any():
        msg = f"layer {name}: destination regions overlap; the layout parser described them wrongly"
        raise LayoutError(msg)
    for arr in (s_all, d_all, l_all):
        arr.setflags(write=False)
    return Template(s_all, d_all, l_all)


# -- per request ------------------------------------------------------------------------------------

def _load_native():
    if os.environ.get("LLUMNIX_KV_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        module = importlib.import_module("llumnix_kv_core._native")
    except ImportError:
        return None
    return getattr(module, "plan_segments", None)


_native_plan = _load_native()
implementation = "native" if _native_plan is not None else "numpy"


def plan_tensor_numpy(tpl: Template, src: TensorLayout, sb: np.ndarray, dst: TensorLayout,
                      db: np.ndarray) -> SegmentPlan:
    """The NumPy path of :func:`plan_tensor` (block ids already checked)."""
    s = (sb[:, None] * src.block_stride + tpl.src_offsets[None, :]).reshape(-1)
    d = (db[:, None] * dst.block_stride + tpl.dst_offsets[None, :]).reshape(-1)
    n = np.broadcast_to(tpl.lengths[None, :], (len(sb), len(tpl))).reshape(-1)
    s, d, n = _coalesce(s, d, n)
    return SegmentPlan(s.astype(np.uint64), d.astype(np.uint64), n.astype(np.uint64))


def plan_tensor(tpl: Template, src: TensorLayout, src_blocks: Sequence[int] | np.ndarray, dst: TensorLayout,
                dst_blocks: Sequence[int] | np.ndarray) -> SegmentPlan:
    """Coalesced segments moving ``src_blocks[i]`` of ``src`` into ``dst_blocks[i]`` of ``dst`` with ``tpl``.

    Offsets are relative to each tensor's ``addr``, so one plan serves every layer of equal geometry.
    """
    sb = np.asarray(src_blocks, dtype=np.int64)
    db = np.asarray(dst_blocks, dtype=np.int64)
    if len(sb) != len(db):
        msg = f"{len(sb)} source blocks but {len(db)} destination blocks"
        raise LayoutError(msg)
    for blocks, t, side in ((sb, src, "source"), (db, dst, "destination")):
        if len(blocks) and (blocks.min() < 0 or blocks.max() >= t.num_blocks):
            msg = f"{side} block id out of range [0, {t.num_blocks}) for layer {t.name!r}"
            raise LayoutError(msg)
    if len(tpl) == 0 or len(sb) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return SegmentPlan(empty, empty, empty)
    if _native_plan is not None:
        s, d, n = _native_plan(sb, db, src.block_stride, dst.block_stride, src.num_blocks, dst.num_blocks,
                               tpl.src_offsets, tpl.dst_offsets, tpl.lengths)
        return SegmentPlan(s, d, n)
    return plan_tensor_numpy(tpl, src, sb, dst, db)
