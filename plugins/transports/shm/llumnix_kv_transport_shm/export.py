"""The region table a side announces at handshake, and how each GPU region is exported.

GPU regions are exported per allocation, decided per region:

* virtual memory (``cuMemCreate``/``cuMemMap``, e.g. vLLM 0.34's extensible KV cache): the
  physical allocation as a POSIX file descriptor (``entry["vmm"]`` indexes the announced
  allocations; the descriptors travel over :mod:`~llumnix_kv_transport_shm.fd_channel`);
* any other device memory (``cudaMalloc``): a legacy CUDA IPC handle (``entry["handle"]``).

Memory that cannot be exported fails the handshake naming the cause and the fix; there is no
fall-back to another path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_transport_shm.ipc import cuda_core
from llumnix_kv_transport_shm.ipc import device_index


@dataclass
class ExportedRegions:
    """The announced table, the size of each exported allocation and its descriptor (owned until handed on)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class _Exporter:
    """One export pass: each allocation once, however many regions lie in it."""

    def __init__(self) -> None:
        self.out = ExportedRegions()
        self._legacy: dict[int, str] = {}  # allocation base -> IPC handle (hex)
        self._vmm: dict[int, int] = {}  # allocation base -> index into out.sizes / out.fds

    def gpu_fields(self, cuda: Any, r: MemoryRegion) -> dict[str, Any]:
        try:
            vmm = cuda.is_vmm(r.addr)
        except RuntimeError as exc:
            msg = f"cannot inspect GPU region {r.region_id} ({r.device}) for export: {exc}"
            raise TransferError(msg) from exc
        return self._vmm_fields(cuda, r) if vmm else self._legacy_fields(cuda, r)

    def _vmm_fields(self, cuda: Any, r: MemoryRegion) -> dict[str, Any]:
        base, size = cuda.mem_get_address_range(r.addr)
        if r.addr + r.nbytes > base + size:
            msg = (f"GPU region {r.region_id} ({r.device}, {r.nbytes} bytes at 0x{r.addr:x}) spans several virtual-"
                   f"memory allocations (the one it starts in ends at 0x{base + size:x}): the shm transport maps one "
                   "allocation per region; back each registered region with one cuMemCreate allocation (vLLM 0.34 "
                   "does when the KV connector declares exports_fd)")
            raise TransferError(msg)
        index = self._vmm.get(base)
        if index is None:
            try:
                fd, fd_base, fd_size = cuda.vmm_export_fd(base)
            except RuntimeError as exc:
                msg = f"cannot export GPU region {r.region_id} ({r.device}) to the shm peer: {exc}"
                raise TransferError(msg) from exc
            self.out.fds.append(fd)
            if (fd_base, fd_size) != (base, size):
                msg = (f"GPU region {r.region_id}: the exported allocation [0x{fd_base:x}, +{fd_size}) is not the "
                       f"mapping [0x{base:x}, +{size}) that holds the region")
                raise TransferError(msg)
            index = self._vmm[base] = len(self.out.sizes)
            self.out.sizes.append(size)
        return {"vmm": index, "offset": r.addr - base}

    def _legacy_fields(self, cuda: Any, r: MemoryRegion) -> dict[str, Any]:
        base, _size = cuda.mem_get_address_range(r.addr)
        if base not in self._legacy:
            try:
                self._legacy[base] = cuda.ipc_get_mem_handle(base).hex()
            except RuntimeError as exc:
                msg = (f"cannot export GPU region {r.region_id} ({r.device}) through legacy CUDA IPC: {exc}. Memory "
                       "from cudaMalloc (PyTorch's default allocator) exports through legacy IPC and exportable "
                       "virtual memory (cuMemCreate with POSIX file descriptor handles) through its descriptors; "
                       "other memory (e.g. cudaMallocAsync pools) does not: register memory of one of those kinds")
                raise TransferError(msg) from exc
        return {"handle": self._legacy[base], "offset": r.addr - base}


def export_regions(memory: MemoryRegistry) -> ExportedRegions:
    """The region table sent at handshake: sizes and kinds, plus how to reach each GPU region.

    The caller owns the returned descriptors (``fds``); on failure none is left open.
    """
    ex = _Exporter()
    try:
        for r in memory.regions():
            entry: dict[str, Any] = {"region": r.region_id, "device": r.device, "nbytes": r.nbytes, "addr": r.addr}
            dev = device_index(r.device)
            if dev is not None:
                cuda = cuda_core()
                cuda.set_device(dev)
                entry.update(ex.gpu_fields(cuda, r))
            ex.out.entries.append(entry)
    except BaseException:
        ex.out.close_fds()
        raise
    return ex.out
