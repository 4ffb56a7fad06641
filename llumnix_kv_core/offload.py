"""GPU <-> pinned host copies of scattered KV blocks, for offloading (the first tier of a KV store).

The same one-launch gather/scatter kernel as the GPU transports moves every block of a request
in one call per tensor batch; the copy engines' batched API is the alternative (``method="ce"``).
Copies run on the offloader's own stream and return a handle; nothing here blocks the caller
except an explicit ``wait``::

    off = BlockOffloader(device=0)
    host = PinnedBuffer(n_blocks * gpu_layer.block_stride)
    host_layer = compact_like(gpu_layer, host.addr, n_blocks)
    off.store(gpu_layer, [7, 3, 9], host_layer, [0, 1, 2], after=layer_event).wait()
    off.load(host_layer, [0, 1, 2], gpu_layer, [11, 12, 13]).wait()
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import plan_blocks

METHODS = ("kernel", "ce")


class PinnedBuffer:
    """Page-locked host memory (``cudaHostAlloc``), freed by ``close``."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            msg = f"a pinned buffer needs a positive size, got {nbytes}"
            raise ValueError(msg)
        self._cuda = native.cuda()
        self.nbytes = int(nbytes)
        self.addr = self._cuda.malloc_host(self.nbytes)

    def array(self) -> np.ndarray:
        """A uint8 NumPy view of the buffer (valid until ``close``)."""
        return np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * self.nbytes).from_address(self.addr))

    def close(self) -> None:
        if self.addr:
            self._cuda.free_host(self.addr)
            self.addr = 0

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compact_like(t: TensorLayout, addr: int, num_blocks: int) -> TensorLayout:
    """A layout with ``t``'s block geometry, ``num_blocks`` blocks packed from ``addr`` (a host copy)."""
    span = max(t.unit_offsets) + t.unit_bytes
    return replace(t, addr=int(addr), num_blocks=int(num_blocks), block_stride=span, extent=span * int(num_blocks))


class OffloadHandle:
    """One submitted copy: ``done()`` polls, ``wait()`` blocks (bounded), both without a device sync."""

    def __init__(self, cuda: Any, event: int, nbytes: int) -> None:
        self._cuda = cuda
        self._event = event
        self.nbytes = nbytes

    def done(self) -> bool:
        if not self._event:
            return True
        if self._cuda.event_query(self._event):
            self._release()
            return True
        return False

    def wait(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 0.0
        while not self.done():
            if time.monotonic() > deadline:
                msg = f"offload copy of {self.nbytes} bytes did not finish within {timeout_s:g} s"
                raise TransferTimeoutError(msg)
            pause = min(max(pause * 2, 10e-6), 1e-3)
            time.sleep(pause)

    @property
    def event(self) -> int:
        """The CUDA event recorded after the copy (0 once released): make other streams wait on it."""
        return self._event

    def _release(self) -> None:
        if self._event:
            self._cuda.event_destroy(self._event)
            self._event = 0


class BlockOffloader:
    """Copies blocks between GPU tensors and pinned host tensors of one device, on its own stream."""

    def __init__(self, device: int = 0, method: str = "kernel") -> None:
        if method not in METHODS:
            msg = f"offload method {method!r} is unknown; use one of {', '.join(METHODS)}"
            raise ValueError(msg)
        self._cuda = native.cuda()
        self.device = int(device)
        self.method = method
        self._cuda.set_device(self.device)
        self.stream = self._cuda.stream_create()
        self._checked: set[int] = set()

    def _check_memory(self, t: TensorLayout, side: str) -> None:
        if t.addr in self._checked:
            return
        kind, device = self._cuda.pointer_info(t.addr)
        if kind == "unregistered":
            msg = (f"{side} tensor {t.name!r} is pageable host memory, which a GPU copy cannot read or write "
                   "safely: allocate it with PinnedBuffer (or cudaHostAlloc / cudaHostRegister)")
            raise LayoutError(msg)
        if kind == "device" and device != self.device:
            msg = f"{side} tensor {t.name!r} is on cuda:{device}; this offloader serves cuda:{self.device}"
            raise LayoutError(msg)
        self._checked.add(t.addr)

    def copy(self, src: TensorLayout, src_blocks: Sequence[int], dst: TensorLayout, dst_blocks: Sequence[int],
             *, after: int | None = None) -> OffloadHandle:
        """Copy ``src_blocks[i]`` of ``src`` into ``dst_blocks[i]`` of ``dst``; ``after``: an event to wait for."""
        self._check_memory(src, "source")
        self._check_memory(dst, "destination")
        plan = plan_blocks(src, src_blocks, dst, dst_blocks)
        cuda = self._cuda
        cuda.set_device(self.device)
        if after is not None:
            cuda.stream_wait_event(self.stream, after)
        s = plan.src_offsets + np.uint64(src.addr)
        d = plan.dst_offsets + np.uint64(dst.addr)
        if self.method == "kernel":
            cuda.copy_segments(s, d, plan.lengths, self.stream)
        else:
            cuda.copy_segments_ce(s, d, plan.lengths, self.stream)
        event = cuda.event_create()
        cuda.event_record(event, self.stream)
        return OffloadHandle(cuda, event, plan.nbytes)

    def store(self, gpu: TensorLayout, gpu_blocks: Sequence[int], host: TensorLayout, host_blocks: Sequence[int],
              *, after: int | None = None) -> OffloadHandle:
        """GPU blocks -> pinned host blocks."""
        return self.copy(gpu, gpu_blocks, host, host_blocks, after=after)

    def load(self, host: TensorLayout, host_blocks: Sequence[int], gpu: TensorLayout, gpu_blocks: Sequence[int],
             *, after: int | None = None) -> OffloadHandle:
        """Pinned host blocks -> GPU blocks."""
        return self.copy(host, host_blocks, gpu, gpu_blocks, after=after)

    def close(self) -> None:
        if self.stream:
            self._cuda.set_device(self.device)
            self._cuda.stream_destroy(self.stream)
            self.stream = 0
