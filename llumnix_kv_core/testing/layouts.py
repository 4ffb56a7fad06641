"""Test helpers for layout parsers: plan + copy between TP ranks, and vLLM-built caches.

``copy_by_rank_pair`` / ``copy_between_ranks`` run the plan compiler as the transfer agent does (every
decode rank pulls from ``tp_sources``; each source compiles its template and plans the
block pairs) and copies with ``native.copy_segments``. ``vllm_group`` builds one cache group
with vLLM's own ``create_kv_cache_views`` over a flat int8 pool (needs vLLM and torch);
``byte_view`` and ``heads_of_rank`` read such caches back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.plan import tp_sources


def copy_by_rank_pair(src: Sequence[TensorLayout], src_blocks: Sequence[int], dst: Sequence[TensorLayout],
                      dst_blocks: Sequence[int]) -> dict[tuple[int, int], int]:
    """Move ``src_blocks`` of every source rank's tensor into ``dst_blocks`` of every destination rank's.

    ``src[r]`` / ``dst[r]`` are the same layer on TP rank r. Returns the segments per
    (source rank, destination rank) pair that planned a copy.
    """
    segments = {}
    for d, dl in enumerate(dst):
        for p in tp_sources(d, len(dst), len(src)):
            tpl = compile_template(src[p], dl, p, len(src), d, len(dst))
            plan = plan_tensor(tpl, src[p], src_blocks, dl, dst_blocks)
            native.copy_segments(plan.src_offsets + np.uint64(src[p].addr), plan.dst_offsets + np.uint64(dl.addr),
                                 plan.lengths)
            segments[p, d] = len(plan.lengths)
    return segments


def copy_between_ranks(src: Sequence[TensorLayout], src_blocks: Sequence[int], dst: Sequence[TensorLayout],
                       dst_blocks: Sequence[int]) -> list[int]:
    """``copy_by_rank_pair``, returning the segments per destination rank."""
    segments = copy_by_rank_pair(src, src_blocks, dst, dst_blocks)
    return [sum(n for (_, d), n in segments.items() if d == r) for r in range(len(dst))]


@dataclass
class VllmGroup:
    """One vLLM cache group on one TP rank: the int8 pool, per-layer views and the description."""

    pool: Any  # torch.int8 tensor
    views: dict[str, Any]  # layer name -> [B, H, N, C] view, as vLLM registers it
    desc: Any  # CacheGroupDescription


def vllm_group(spec: Any, layers: Sequence[str], num_blocks: int, layout: str, *, kind: str, backend: str,
               extra: dict[str, Any] | None = None, seed: int = 0, group_id: int = 0,
               spec_per_layer: dict[str, Any] | None = None) -> VllmGroup:
    """Allocate ``layers`` of ``spec`` like vLLM's ``_allocate_kv_cache`` does for one KVCacheTensor each.

    ``spec_per_layer`` gives other specs to some layers (DSA indexer layers); each such layer gets
    its own tensor. The pool is filled with random bytes.
    """
    import torch
    from vllm.v1.kv_cache_interface import KVCacheTensor
    from vllm.v1.kv_cache_interface import compute_layout_strides
    from vllm.v1.kv_cache_interface import create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from llumnix_kv_core.layout import CacheGroupDescription
    from llumnix_kv_core.layout import TensorDescription

    lay = KVCacheLayout[layout]
    specs = {n: (spec_per_layer or {}).get(n, spec) for n in layers}
    # Layers of equal spec share one KVCacheTensor (layer stride from vLLM's layout strides).
    buckets: dict[Any, list[str]] = {}
    for n in layers:
        buckets.setdefault(specs[n], []).append(n)
    sizes = []
    plan = []
    for sp, names in buckets.items():
        strides = compute_layout_strides(sp, num_blocks, len(names), lay)
        size = strides[0] * len(names) if lay.is_layer_compact else strides[1] * num_blocks
        plan.append((sp, names, strides, size))
        sizes.append(size)
    pool = torch.empty(sum(sizes), dtype=torch.int8)
    g = torch.Generator().manual_seed(seed)
    pool.copy_(torch.randint(-128, 128, (pool.numel(),), dtype=torch.int8, generator=g))
    views: dict[str, Any] = {}
    offset = 0
    for sp, names, strides, size in plan:
        kt = KVCacheTensor(size=size, layers=list(names), layer_stride=strides[0], block_stride=strides[1],
                           offset=offset)
        for n, v in zip(names, create_kv_cache_views(pool, sp, num_blocks, lay, kt)):
            views[n] = v
        offset += size
    tensors = []
    for n in layers:
        v = views[n]
        es = v.element_size()
        tensors.append(TensorDescription(n, v.data_ptr(), tuple(v.shape), tuple(s * es for s in v.stride()), es))
    dtype = str(getattr(spec, "dtype", None))
    desc = CacheGroupDescription("vllm", group_id, kind, backend, layout, spec.block_size, dtype, tuple(tensors),
                                 dict(extra or {}))
    return VllmGroup(pool, views, desc)


def heads_of_rank(rank: int, tp: int, heads: int) -> list[int]:
    """Global head ids TP rank ``rank`` holds (vLLM: split, or replicated when tp > heads)."""
    if heads >= tp:
        per = heads // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (tp // heads)]


def byte_view(pool: Any, view: Any, origin: Any = None) -> Any:
    """The int8 ``[..., C bytes]`` view of ``view`` over ``pool``, with the strides it has over ``origin``.

    ``origin`` (default ``pool``) is the pool ``view`` was made from; pass it to see the same bytes
    in a copy of that pool.
    """
    import torch

    origin = pool if origin is None else origin
    es = view.element_size()
    shape = (*view.shape[:-1], view.shape[-1] * es)
    strides = (*(s * es for s in view.stride()[:-1]), 1)
    return torch.as_strided(pool, shape, strides, view.data_ptr() - origin.data_ptr())
