"""KV layouts as data.

An engine describes each cache group with a :class:`CacheGroupDescription`
(per-layer tensors with their byte strides). A layout parser turns it into a
:class:`KVLayout`: for every tensor, where block ``b`` starts, and the
*regions* inside a block: strided arrays whose dims carry a meaning (heads,
tokens, state rows, content) and, for tensor parallelism, which dim is split
across ranks and how (:class:`Shard`). Every offset is derived from shapes and
strides; nothing is hard-coded per backend.

``plan_blocks`` moves whole blocks between two equal geometries; the general
plan compiler (different layouts, different TP sizes) is in
:mod:`llumnix_kv_core.plan`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.errors import LayoutError


@dataclass(frozen=True)
class TensorDescription:
    """One registered cache tensor as the engine shows it.

    ``shape`` and ``strides`` (in bytes) follow the engine's logical order, for
    vLLM ``[B, H, N, C]`` with ``C`` counted in elements of ``itemsize`` bytes.
    """

    name: str
    addr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int
    device: str = "cpu"


@dataclass(frozen=True)
class CacheGroupDescription:
    """Engine-neutral description of one cache group (layers sharing block ids)."""

    engine: str
    group_id: int
    kind: str  # "attention", "mla", "mamba", ...
    backend: str  # engine's attention backend name, e.g. "FLASH_ATTN", "CPU_ATTN"
    layout: str  # engine's layout name, e.g. "LBNHC"
    block_size: int
    dtype: str
    tensors: tuple[TensorDescription, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dim:
    """One dim of a region: ``size`` elements, ``stride`` bytes apart."""

    name: str
    size: int
    stride: int


@dataclass(frozen=True)
class Shard:
    """How a region is split over tensor-parallel ranks.

    The region's dim ``dim`` is the concatenation of channel groups whose *global*
    sizes are ``groups`` (one group for attention heads; Q|K|V for a GDN conv state;
    K slots then V slots for NVFP4 head slots). Rank ``r`` of ``tp`` holds, of every
    group of global size ``g``, the slice ``[r*g/tp, (r+1)*g/tp)`` when ``tp`` divides
    ``g``, or the single index ``r // (tp/g)`` (replicated over ``tp/g`` ranks) when
    ``g`` divides ``tp``; its local dim is those slices concatenated.
    """

    dim: str
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Region:
    """A strided array inside every block of a tensor.

    Element ``(i_0, ..., i_k)`` lies at ``block start + offset + sum(i_j * dims[j].stride)``
    and is ``itemsize`` contiguous bytes. Dims are listed in logical order; two sides
    with the same region (same name, dim names and sizes) hold the same data, whatever
    the memory order of their dims. ``shard`` None: every TP rank holds it all.
    """

    name: str
    offset: int
    itemsize: int
    dims: tuple[Dim, ...]
    shard: Shard | None = None

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.dims:
            n *= d.size
        return n

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        msg = f"region {self.name!r} has no dim {name!r} (dims: {[d.name for d in self.dims]})"
        raise LayoutError(msg)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": self.offset,
            "itemsize": self.itemsize,
            "dims": [[d.name, d.size, d.stride] for d in self.dims],
            "shard": None if self.shard is None else [self.shard.dim, list(self.shard.groups)],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Region:
        shard = d.get("shard")
        return cls(
            str(d["name"]),
            int(d["offset"]),
            int(d["itemsize"]),
            tuple(Dim(str(n), int(s), int(st)) for n, s, st in d["dims"]),
            None if shard is None else Shard(str(shard[0]), tuple(int(g) for g in shard[1])),
        )


@dataclass(frozen=True)
class TensorLayout:
    """Where the bytes of block ``b`` of one tensor are.

    Block ``b`` occupies units ``addr + b * block_stride + unit_offsets[i]``,
    each ``unit_bytes`` long, listed in logical order.
    """

    name: str
    addr: int
    num_blocks: int
    block_stride: int
    unit_offsets: tuple[int, ...]
    unit_bytes: int
    extent: int  # bytes from ``addr`` that the tensor may touch
    logical: tuple[int, ...]  # logical per-block shape, last dim in bytes
    order: str = ""  # memory order of the logical dims inside a block, outermost first (e.g. "HN")
    regions: tuple[Region, ...] = ()  # what the bytes of a block mean (empty: opaque units only)

    @property
    def page_bytes(self) -> int:
        return self.unit_bytes * len(self.unit_offsets)

    def geometry(self) -> tuple[Any, ...]:
        """What must match between two sides for a byte-for-byte block copy."""
        return (self.logical, self.order, self.unit_bytes, len(self.unit_offsets))


MOVES_TOKENS = "tokens"
MOVES_LAST_STATE = "last_state"


@dataclass(frozen=True)
class KVLayout:
    """A parsed cache group.

    ``moves`` says how a request's block ids map to what must move: ``"tokens"``
    (attention: block position ``i`` holds tokens ``[i*block_size, (i+1)*block_size)``,
    the blocks of the transferred token range move) or ``"last_state"`` (Mamba/GDN
    state slots: only the last valid state block moves, once the prefill is complete).
    """

    parser: str
    group_id: int
    kind: str
    block_size: int
    tensors: tuple[TensorLayout, ...]
    signature: Mapping[str, Any]  # what both sides must agree on (checked at handshake)
    moves: str = MOVES_TOKENS
    detail: Mapping[str, Any] = field(default_factory=dict)  # parser-specific facts, for display

    def tensor(self, name: str) -> TensorLayout:
        for t in self.tensors:
            if t.name == name:
                return t
        msg = f"layer {name!r} is not part of cache group {self.group_id}"
        raise LayoutError(msg)


def strided_units(shape: Sequence[int], strides: Sequence[int], content_bytes: int) -> tuple[tuple[int, ...], int]:
    """Split a block of logical ``shape`` (outer dims) x ``content_bytes`` into contiguous units.

    Dims whose stride continues the current contiguous run are merged into it
    (innermost first); the rest are enumerated in logical order.
    Returns (unit offsets within the block, unit length).
    """
    run = content_bytes
    dims = [(int(n), int(s)) for n, s in zip(shape, strides)]
    merged = True
    while merged:
        merged = False
        for i, (n, s) in enumerate(dims):
            if n == 1 or s == run:
                run *= n
                dims.pop(i)
                merged = True
                break
    offsets = np.zeros(1, dtype=np.int64)
    for n, s in dims:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return tuple(int(o) for o in offsets), run


def tensor_layout_from_bhnc(t: TensorDescription, shard: Shard | None = None, region: str = "kv") -> TensorLayout:
    """TensorLayout of a ``[B, H, N, C]`` view with arbitrary byte strides.

    Its one region (``region``) has dims H (heads), N (tokens), C (content elements of
    ``itemsize`` bytes); ``shard`` says how H is split over TP ranks.
    """
    if len(t.shape) != 4 or len(t.strides) != 4:
        msg = f"tensor {t.name!r} has shape {t.shape}; a [blocks, heads, tokens, content] view was expected"
        raise LayoutError(msg)
    b, h, n, c = t.shape
    sb, sh, sn, sc = t.strides
    if c > 1 and sc != t.itemsize:
        msg = f"tensor {t.name!r}: the content dim has stride {sc} bytes, not {t.itemsize}; unsupported"
        raise LayoutError(msg)
    offsets, unit = strided_units((h, n), (sh, sn), c * t.itemsize)
    extent = (b - 1) * sb + max(offsets) + unit if b else 0
    order = dim_order("HN", (h, n), (sh, sn))
    reg = Region(region, 0, t.itemsize, (Dim("H", h, sh), Dim("N", n, sn), Dim("C", c, t.itemsize)), shard)
    return TensorLayout(t.name, t.addr, b, sb, offsets, unit, extent, (h, n, c * t.itemsize), order, (reg,))


def tensor_layout_from_regions(name: str, addr: int, num_blocks: int, block_stride: int,
                               regions: Sequence[Region]) -> TensorLayout:
    """TensorLayout of a tensor whose blocks hold ``regions`` (units: each region's contiguous runs)."""
    units: list[tuple[int, int]] = []
    for r in regions:
        offs, unit = strided_units([d.size for d in r.dims], [d.stride for d in r.dims], r.itemsize)
        units += [(r.offset + o, unit) for o in offs]
    units.sort()
    merged: list[list[int]] = []
    for o, n in units:
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1][1] += n
        else:
            merged.append([o, n])
    lengths = {n for _, n in merged}
    if len(lengths) == 1:
        offsets, unit = tuple(o for o, _ in merged), lengths.pop()
    else:  # units of unequal length: one unit per byte range is not expressible; use the page span
        lo = min(o for o, _ in merged)
        offsets, unit = (lo,), max(o + n for o, n in merged) - lo
    extent = (num_blocks - 1) * block_stride + offsets[-1] + unit if num_blocks else 0
    logical = tuple(x for r in regions for x in ([d.size for d in r.dims] + [r.itemsize]))
    order = ";".join(r.name + ":" + dim_order("".join(d.name[0] for d in r.dims), [d.size for d in r.dims],
                                               [d.stride for d in r.dims]) for r in regions)
    return TensorLayout(name, addr, num_blocks, block_stride, offsets, unit, extent, logical, order, tuple(regions))


def dim_order(names: str, sizes: Sequence[int], strides: Sequence[int]) -> str:
    """Names of the dims of size > 1, outermost (largest stride) first."""
    dims = sorted((s, name) for name, n, s in zip(names, sizes, strides) if n > 1)
    return "".join(name for _, name in reversed(dims))


def signature_hash(signature: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        out[f"{prefix}.count"] = len(value)
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


# Fields whose mismatch deserves more than "use the same configuration".
_HINTS = {
    "isa": "CPU attention pages are packed for the CPU's instruction set (vec, vec16, amx, neon, ...): they can "
           "move only between hosts that pack them the same way",
    "tensor_parallel_size": "one TP size must divide the other",
}


def check_compatible(
    local: Mapping[str, Any],
    remote: Mapping[str, Any],
    *,
    what: str = "KV cache",
    sides: tuple[str, str] = ("here", "peer"),
) -> None:
    """Raise IncompatiblePeerError naming every field on which two signatures differ, with both values.

    Nested fields (the per-group layout signatures) are compared leaf by leaf and named by path,
    e.g. ``groups[0].isa: sender='amx' receiver='vec'``.
    """
    flat_a: dict[str, Any] = {}
    flat_b: dict[str, Any] = {}
    _flatten(dict(local), "", flat_a)
    _flatten(dict(remote), "", flat_b)
    keys = sorted(set(flat_a) | set(flat_b))
    a, b = sides
    diffs = [f"{k}: {a}={flat_a.get(k)!r} {b}={flat_b.get(k)!r}" for k in keys if flat_a.get(k) != flat_b.get(k)]
    if diffs:
        hints = sorted({h for k in keys if flat_a.get(k) != flat_b.get(k)
                        for f, h in _HINTS.items() if k.rsplit(".", 1)[-1] == f})
        msg = (
            f"{what} of the two instances differ ({'; '.join(diffs)}). "
            + ("".join(h + ". " for h in hints))
            + "Run prefill and decode with the same model, dtype, block size, KV cache format and a compatible "
            "parallel configuration."
        )
        raise IncompatiblePeerError(msg)


def layout_signature(kind: str, content: str, dtype: str, block_size: int, **extra: Any) -> dict[str, Any]:
    """The per-group record both sides must agree on: what the bytes mean, not where they sit.

    Memory order (NHD/HND, SD/DS) and TP slicing are left out on purpose: the plan compiler
    checks and bridges those when it pairs the two sides' regions.
    """
    return {"kind": kind, "content": content, "dtype": dtype, "block_size": block_size, **extra}


def heads_shard(desc: CacheGroupDescription, local_heads: int, dim: str = "H", slots_per_head: int = 1) -> Shard:
    """The TP split of a heads dim, from the description's ``tp_size`` and ``total_num_kv_heads``.

    ``slots_per_head`` 2: the dim holds K slots of every head then V slots (NVFP4 head slots).
    """
    tp = int(desc.extra.get("tp_size", 1) or 1)
    total = desc.extra.get("total_num_kv_heads")
    per_slot = local_heads // slots_per_head
    if total is None:
        total = per_slot * tp
    return Shard(dim, (int(total),) * slots_per_head)


def _coalesce(src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(src) <= 1:
        return src, dst, length
    brk = np.empty(len(src), dtype=bool)
    brk[0] = True
    brk[1:] = (src[1:] != src[:-1] + length[:-1]) | (dst[1:] != dst[:-1] + length[:-1])
    starts = np.flatnonzero(brk)
    return src[starts], dst[starts], np.add.reduceat(length, starts)


@dataclass(frozen=True)
class SegmentPlan:
    """Segments of one tensor: copy ``lengths[i]`` bytes from ``src_offsets[i]`` to ``dst_offsets[i]``.

    Offsets are relative to each side's tensor ``addr``.
    """

    src_offsets: np.ndarray
    dst_offsets: np.ndarray
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())


def plan_blocks(
    src: TensorLayout, src_blocks: Sequence[int], dst: TensorLayout, dst_blocks: Sequence[int]
) -> SegmentPlan:
    """Coalesced segments moving ``src_blocks[i]`` of ``src`` into ``dst_blocks[i]`` of ``dst``."""
    if len(src_blocks) != len(dst_blocks):
        msg = f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks"
        raise LayoutError(msg)
    if src.geometry() != dst.geometry():
        msg = (
            f"layer {src.name!r}: block geometry differs (source {src.geometry()}, destination "
            f"{dst.geometry()}); both sides need the same layout for a direct copy"
        )
        raise IncompatiblePeerError(msg)
    sb = np.asarray(src_blocks, dtype=np.int64)
    db = np.asarray(dst_blocks, dtype=np.int64)
    for blocks, t, side in ((sb, src, "source"), (db, dst, "destination")):
        if len(blocks) and (blocks.min() < 0 or blocks.max() >= t.num_blocks):
            msg = f"{side} block id out of range [0, {t.num_blocks}) for layer {t.name!r}"
            raise LayoutError(msg)
    su = np.asarray(src.unit_offsets, dtype=np.int64)
    du = np.asarray(dst.unit_offsets, dtype=np.int64)
    s = (sb[:, None] * src.block_stride + su[None, :]).reshape(-1)
    d = (db[:, None] * dst.block_stride + du[None, :]).reshape(-1)
    n = np.full(len(s), src.unit_bytes, dtype=np.int64)
    s, d, n = _coalesce(s, d, n)
    return SegmentPlan(s.astype(np.uint64), d.astype(np.uint64), n.astype(np.uint64))
