"""Test helpers for layout parsers: plan + copy between TP ranks, and vLLM-built caches.

``copy_by_rank_pair`` / ``copy_between_ranks`` run the plan compiler as the transfer agent does (every
decode rank pulls from ``tp_sources``; each source compiles its template and plans the
block pairs) and copies with ``native.copy_segments``. ``vllm_group`` builds one cache group
with vLLM's own ``create_kv_cache_views`` over a flat int8 pool (needs vLLM and torch).

For transport plugins: ``Recorder`` (a frame handler that records every callback),
``registered`` buffers, ``scatter_plan`` / ``expected_copy`` segment plans, ``raw_frame`` /
``read_frame`` for speaking the wire format over a raw socket, and the data of the
multi-process tests: a sender fills ``MP_BLOCKS * MP_BLOCK`` bytes with ``pattern`` and
scatters them by ``mp_plan``; the receiver's buffer digest must equal ``mp_expected_digest``.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.plan import tp_sources
from llumnix_kv_core.wire import Kind


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


# -- transport plugins ---------------------------------------------------------------------
WAIT_S = 20.0
MP_BLOCKS = 8192
MP_BLOCK = 4096

class Recorder(FrameHandler):
    """Records every callback; ``wait`` blocks until a predicate over the records holds."""

    def __init__(self, refuse: set[bytes] | None = None,
                 on_control_cb: Callable[[Channel, Kind, bytes, dict[str, Any]], None] | None = None,
                 accept_cb: Callable[[bytes, int], bool] | None = None) -> None:
        self.cond = threading.Condition()
        self.refuse = refuse or set()
        self.on_control_cb = on_control_cb
        self.accept_cb = accept_cb
        self.data: list[tuple[Channel, bytes, int, int, int]] = []
        self.controls: list[tuple[Channel, Kind, bytes, dict[str, Any]]] = []
        self.closed: list[tuple[Channel, BaseException | None]] = []
        self.asked: list[tuple[bytes, int]] = []

    def accept_data(self, transfer_id: bytes, layer: int) -> bool:
        with self.cond:
            self.asked.append((transfer_id, layer))
            self.cond.notify_all()
        if self.accept_cb is not None:
            return self.accept_cb(transfer_id, layer)
        return transfer_id not in self.refuse

    def on_data(self, channel, transfer_id, layer, nbytes, n_segments) -> None:
        with self.cond:
            self.data.append((channel, transfer_id, layer, nbytes, n_segments))
            self.cond.notify_all()

    def on_control(self, channel, kind, transfer_id, body) -> None:
        with self.cond:
            self.controls.append((channel, kind, transfer_id, body))
            self.cond.notify_all()
        if self.on_control_cb is not None:
            self.on_control_cb(channel, kind, transfer_id, body)

    def on_closed(self, channel, error) -> None:
        with self.cond:
            self.closed.append((channel, error))
            self.cond.notify_all()

    def wait(self, pred: Callable[[Recorder], bool], timeout: float = WAIT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self), timeout):
                msg = (f"condition not met within {timeout} s: data={len(self.data)} "
                       f"controls={len(self.controls)} closed={[(c.peer_name, e) for c, e in self.closed]}")
                raise AssertionError(msg)


def registered(memory: MemoryRegistry, region_id: int, nbytes: int, fill: int | None = 0) -> np.ndarray:
    buf = np.zeros(nbytes, dtype=np.uint8) if fill == 0 else np.full(nbytes, fill, dtype=np.uint8)
    memory.register(MemoryRegion(region_id, buf.ctypes.data, buf.nbytes))
    return buf


def scatter_plan(rng: np.random.Generator, n: int, block: int, jitter: bool = True):
    """``n`` segments of about ``block`` bytes: (src offsets, dst offsets, lengths), destination shuffled.

    Source segment i and destination segment perm[i] live in slots of ``block`` bytes; lengths vary
    (1 .. block) when ``jitter`` so segment boundaries are not aligned.
    """
    lengths = rng.integers(1, block + 1, size=n, dtype=np.uint64) if jitter else np.full(n, block, np.uint64)
    src = np.arange(n, dtype=np.uint64) * np.uint64(block)
    dst = rng.permutation(n).astype(np.uint64) * np.uint64(block)
    return src, dst, lengths


def expected_copy(src_buf: np.ndarray, dst_size: int, src_off, dst_off, lengths,
                  base: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(dst_size, dtype=np.uint8) if base is None else base.copy()
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist(), strict=True):
        out[d:d + n] = src_buf[s:s + n]
    return out


def raw_frame(kind: Kind, *, tid: bytes = b"\x01" * 16, body: bytes = b"", table: bytes = b"",
              n_segments: int = 0, payload_len: int = 0, magic: int = wire.MAGIC,
              version: int = wire.VERSION) -> bytes:
    head = wire.HEADER.pack(magic, version, int(kind), tid, 0, n_segments, len(body), 0, payload_len)
    return head + body + table


def read_frame(sock: socket.socket, timeout: float = WAIT_S) -> tuple[wire.FrameHeader, dict] | None:
    """One control frame from a raw socket, or None on EOF."""
    sock.settimeout(timeout)

    def exact(n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            k = sock.recv(n - len(out))
            if not k:
                return None
            out += k
        return out

    head = exact(wire.HEADER_SIZE)
    if head is None:
        return None
    h = wire.unpack_header(head)
    body = exact(h.body_len) if h.body_len else b""
    return h, wire.decode_body(body or b"")


def pattern(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def mp_plan(seed: int):
    rng = np.random.default_rng(seed + 1)
    return scatter_plan(rng, MP_BLOCKS, MP_BLOCK)


def mp_expected_digest(seed: int) -> str:
    src = pattern(seed, MP_BLOCKS * MP_BLOCK)
    s, d, n = mp_plan(seed)
    return hashlib.sha256(expected_copy(src, MP_BLOCKS * MP_BLOCK, s, d, n).tobytes()).hexdigest()
