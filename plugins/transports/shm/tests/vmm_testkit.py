"""vLLM-shaped GPU caches in raw device memory, and the process entry points of the one-GPU tests.

``kind`` says how the cache is allocated: ``"vmm"`` one exportable virtual-memory allocation per
layer (as vLLM 0.34's extensible KV cache backs each layer segment when the connector declares
``exports_fd``), ``"vmm-closed"`` the same without the POSIX-fd handle type, ``"malloc"`` one
cudaMalloc pool (as vLLM 0.32). Layers are LBNHC ``[B, H, N, C]`` bf16 (C = K|V fused), so block
``b`` of a layer is bytes ``[b * PAGE, (b + 1) * PAGE)`` of it. No torch: the children start fast.
"""

from __future__ import annotations

import logging
import os
import traceback

import numpy as np
from llumnix_kv_transport_shm.fd_channel import FdOffer

from llumnix_kv_core import native
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc

LAYERS, HEADS, TOKENS, HEAD_SIZE = 4, 4, 16, 64
C = 2 * HEAD_SIZE  # elements of one token of one head (K|V fused)
PAGE = HEADS * TOKENS * C * 2  # bytes of one block of one layer (16 KiB)
BLOCKS = 128  # 2 MiB per layer: one granule


def initial_layers(seed: int, blocks: int = BLOCKS) -> list[np.ndarray]:
    """The contents a cache of ``seed`` starts with: one ``[blocks, PAGE]`` uint8 array per layer."""
    rng = np.random.default_rng(seed)
    return [np.frombuffer(bytearray(rng.bytes(blocks * PAGE)), np.uint8).reshape(blocks, PAGE) for _ in range(LAYERS)]


class RawCache:
    """A cache on ``cuda:device`` of the given kind, filled with :func:`initial_layers` of ``seed``."""

    def __init__(self, kind: str, seed: int, device: int = 0, blocks: int = BLOCKS) -> None:
        self.cuda = native.cuda()
        self.cuda.set_device(device)
        self.kind, self.device, self.blocks = kind, device, blocks
        layer_bytes = blocks * PAGE
        self._pool = 0
        if kind in ("vmm", "vmm-closed"):
            self.ptrs = [self.cuda.vmm_alloc(device, layer_bytes, exportable=kind == "vmm") for _ in range(LAYERS)]
        elif kind == "malloc":
            self._pool = self.cuda.malloc(LAYERS * layer_bytes)
            self.ptrs = [self._pool + i * layer_bytes for i in range(LAYERS)]
        else:
            raise ValueError(kind)
        for ptr, data in zip(self.ptrs, initial_layers(seed, blocks)):
            self.cuda.memcpy_htod(ptr, data.ctypes.data, data.nbytes)
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        strides = (TOKENS * HEADS * C * 2, C * 2, HEADS * C * 2, 2)  # LBNHC, bytes
        tensors = tuple(
            tensor_layout_from_bhnc(TensorDescription(name, ptr, (blocks, HEADS, TOKENS, C), strides, 2,
                                                      f"cuda:{device}"))
            for name, ptr in zip(self.names, self.ptrs)
        )
        self.layout = KVLayout("flash_attn", 0, "attention", TOKENS, tensors,
                               {"layout": "LBNHC", "page": [HEADS, TOKENS, C * 2]})

    def signature(self) -> dict:
        return {"model": "toy", "dtype": "bfloat16", "groups": [dict(self.layout.signature)]}

    def read(self) -> list[np.ndarray]:
        out = []
        for ptr in self.ptrs:
            a = np.empty((self.blocks, PAGE), dtype=np.uint8)
            self.cuda.memcpy_dtoh(a.ctypes.data, ptr, a.nbytes)
            out.append(a)
        return out

    def free(self) -> None:
        self.cuda.set_device(self.device)
        if self._pool:
            self.cuda.free(self._pool)
        else:
            for ptr in self.ptrs:
                self.cuda.vmm_free(ptr)
        self.ptrs = []


class LogLines(logging.Handler):
    """INFO lines of the shm transport, collected in this process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        log = logging.getLogger("llumnix_kv_transport_shm")
        log.setLevel(logging.INFO)
        log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def sender_main(q_in, q_out, kind: str, seed: int, blocks: int = BLOCKS) -> None:
    """The sending instance (P) on GPU0: offers blocks on request; reports its transport's log at the end."""
    try:
        import gpu_testkit

        logs = LogLines()
        cache = RawCache(kind, seed, blocks=blocks)
        a = gpu_testkit.agent(cache, "cuda:0")
        q_out.put(("ready", a.listen("127.0.0.1", 0), os.getpid()))
        while True:
            cmd = q_in.get(timeout=600)
            if cmd[0] == "stop":
                break
            if cmd[0] == "offer":
                _, tid, pb = cmd
                a.sender.open(tid, {0: pb})
                a.sender.complete(tid, {0: len(pb)})
                q_out.put(("offered", tid))
            elif cmd[0] == "seal":
                a.sender.seal(cmd[1], True, 5.0)
                q_out.put(("sealed", cmd[1]))
        a.close()
        cache.free()
        q_out.put(("stopped", logs.lines))
    except BaseException:
        q_out.put(("error", traceback.format_exc()))


def owner_main(q_in, q_out, size: int, seed: int) -> None:
    """Allocate exportable VMM memory on GPU0, fill it, offer its descriptor; then report what the importer wrote."""
    try:
        cuda = native.cuda()
        cuda.set_device(0)
        ptr = cuda.vmm_alloc(0, size)
        data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        cuda.memcpy_htod(ptr, data.ctypes.data, size)
        fd, base, got = cuda.vmm_export_fd(ptr)
        offer = FdOffer([fd], 60.0)
        q_out.put(("offer", offer.name, os.getpid(), base == ptr, got))
        offset, length, value = q_in.get(timeout=60)
        offer.close()
        seen = np.empty(length, dtype=np.uint8)
        cuda.memcpy_dtoh(seen.ctypes.data, ptr + offset, length)
        q_out.put(("seen", bool((seen == value).all())))
        cuda.vmm_free(ptr)
    except BaseException:
        q_out.put(("error", traceback.format_exc()))
