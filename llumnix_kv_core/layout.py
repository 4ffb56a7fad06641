"""KV layouts as data, and the plan compiler that turns block ids into segments.

An engine describes each cache group with a :class:`CacheGroupDescription`
(per-layer tensors with their byte strides). A layout parser turns it into a
:class:`KVLayout`: for every tensor, where block ``b`` starts and which
contiguous *units* inside a block carry data, in logical order. Every offset is
derived from shapes and strides; nothing is hard-coded per backend.

The plan compiler pairs source and destination blocks and emits coalesced
segments: with equal layouts one run of consecutive blocks of one tensor is one
segment.
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

    @property
    def page_bytes(self) -> int:
        return self.unit_bytes * len(self.unit_offsets)

    def geometry(self) -> tuple[Any, ...]:
        """What must match between two sides for a byte-for-byte block copy."""
        return (self.logical, self.order, self.unit_bytes, len(self.unit_offsets))


@dataclass(frozen=True)
class KVLayout:
    """A parsed cache group."""

    parser: str
    group_id: int
    kind: str
    block_size: int
    tensors: tuple[TensorLayout, ...]
    signature: Mapping[str, Any]  # what both sides must agree on (checked at handshake)

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


def tensor_layout_from_bhnc(t: TensorDescription) -> TensorLayout:
    """TensorLayout of a ``[B, H, N, C]`` view with arbitrary byte strides."""
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
    return TensorLayout(t.name, t.addr, b, sb, offsets, unit, extent, (h, n, c * t.itemsize), order)


def dim_order(names: str, sizes: Sequence[int], strides: Sequence[int]) -> str:
    """Names of the dims of size > 1, outermost (largest stride) first."""
    dims = sorted((s, name) for name, n, s in zip(names, sizes, strides) if n > 1)
    return "".join(name for _, name in reversed(dims))


def signature_hash(signature: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_compatible(
    local: Mapping[str, Any],
    remote: Mapping[str, Any],
    *,
    what: str = "KV cache",
    sides: tuple[str, str] = ("here", "peer"),
) -> None:
    """Raise IncompatiblePeerError naming every field on which two signatures differ, with both values."""
    keys = sorted(set(local) | set(remote))
    a, b = sides
    diffs = [f"{k}: {a}={local.get(k)!r} {b}={remote.get(k)!r}" for k in keys if local.get(k) != remote.get(k)]
    if diffs:
        msg = (
            f"{what} of the two instances differ ({'; '.join(diffs)}). Run prefill and decode with the same "
            "model, dtype, block size, KV layout and parallel configuration."
        )
        raise IncompatiblePeerError(msg)


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
