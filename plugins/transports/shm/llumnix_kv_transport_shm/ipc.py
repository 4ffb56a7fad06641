"""The peer's region table, legacy CUDA IPC mappings of its memory, and checks of local GPU sources."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import NativeUnavailableError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry

MAX_REGIONS = 1 << 20  # region ids a peer may announce (one per cache tensor)


def device_index(device: str) -> int | None:
    """The ordinal of ``"cuda:N"`` (``"cuda"``: 0); None for host memory."""
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


def cuda_core() -> Any:
    """The CUDA core; TransferError naming why it is unusable."""
    try:
        return native.cuda()
    except NativeUnavailableError as exc:
        msg = f"GPU memory is registered but the CUDA core is unusable: {exc}"
        raise TransferError(msg) from exc


@dataclass
class PeerTable:
    """A peer's regions as arrays indexed by region id (kind 0: unknown, 1: host, 2: GPU).

    ``allocations`` are the sizes of the virtual-memory allocations it exported (a GPU entry's
    ``vmm`` indexes them) and ``fd_socket`` names the socket that hands out their descriptors.
    """

    kind: np.ndarray
    nbytes: np.ndarray
    entries: dict[int, dict[str, Any]]
    pid: int
    allocations: tuple[int, ...] = ()
    fd_socket: str = ""

    @classmethod
    def from_hello(cls, body: dict[str, Any]) -> PeerTable:
        """The table of a ``hello`` or ``hello_ok`` message; FrameError if it is malformed."""
        try:
            table = cls.parse(body.get("regions", []), int(body.get("pid", -1)))
            table.allocations = tuple(int(s) for s in body.get("allocations", ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"malformed shm handshake region table ({exc!r}): the peer is not a matching shm transport"
            raise FrameError(msg) from exc
        table.fd_socket = str(body.get("fd_socket", ""))
        return table

    @classmethod
    def parse(cls, regions: list[dict[str, Any]], pid: int) -> PeerTable:
        ids = [int(e["region"]) for e in regions]
        if any(not 0 <= rid < MAX_REGIONS for rid in ids):
            msg = f"a region id of the peer is outside [0, {MAX_REGIONS})"
            raise ValueError(msg)
        n = max(ids, default=-1) + 1
        kind = np.zeros(n, dtype=np.uint8)
        nbytes = np.zeros(n, dtype=np.uint64)
        entries = {}
        for e in regions:
            rid = int(e["region"])
            kind[rid] = 2 if device_index(str(e["device"])) is not None else 1
            nbytes[rid] = int(e["nbytes"])
            entries[rid] = e
        return cls(kind, nbytes, entries, pid)

    def host_addresses(self) -> np.ndarray:
        """Address of every host region in the peer's address space (0 for others)."""
        out = np.zeros(len(self.kind), dtype=np.uint64)
        for rid, e in self.entries.items():
            if self.kind[rid] == 1:
                out[rid] = int(e["addr"])
        return out

    def gpu_paths(self) -> list[str]:
        """How this process reaches the peer's GPU regions, as the log names it."""
        if self.pid == os.getpid():
            return ["pointers of this process"] if (self.kind == 2).any() else []
        gpu = [e for rid, e in self.entries.items() if self.kind[rid] == 2]
        paths = []
        if any("vmm" in e for e in gpu):
            paths.append("exported VMM handles")
        if any("handle" in e for e in gpu):
            paths.append("legacy CUDA IPC")
        return paths

    def kinds_of(self, regions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(regions), dtype=np.uint8)
        known = regions < len(self.kind)
        out[known] = self.kind[regions[known]]
        return out


class IpcMappings:
    """Peer allocations opened in this process, one mapping per handle, closed with the transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], int] = {}

    def base_of(self, handle: str, device: int) -> int:
        key = (handle, device)
        with self._lock:
            base = self._open.get(key)
            if base is None:
                cuda = cuda_core()
                cuda.set_device(device)
                try:
                    base = cuda.ipc_open_mem_handle(bytes.fromhex(handle))
                except RuntimeError as exc:
                    msg = (
                        f"cannot map the peer's GPU memory on cuda:{device} through CUDA IPC: {exc}. Both processes "
                        "must see the peer's GPU (CUDA_VISIBLE_DEVICES) and the GPUs must allow peer access "
                        "(NVLink or PCIe P2P)"
                    )
                    raise TransferError(msg) from exc
                self._open[key] = base
            return base

    def close(self) -> None:
        with self._lock:
            opened, self._open = self._open, {}
        if opened:
            cuda = cuda_core()
            for (_handle, device), base in opened.items():
                cuda.set_device(device)
                cuda.ipc_close_mem_handle(base)


def local_gpu_devices(memory: MemoryRegistry) -> list[int]:
    """The devices of this side's registered GPU memory (where a GPU frame's sources can lie)."""
    return sorted({d for r in memory.regions() if (d := device_index(r.device)) is not None})


def local_gpu_sources(memory: MemoryRegistry, src: np.ndarray, lengths: np.ndarray) -> int:
    """The device that holds every source segment; TransferError if any lies outside registered GPU memory.

    A kernel reading pageable host memory or unregistered addresses would fault and poison the
    CUDA context, so sources are checked against this side's registered GPU regions first.
    """
    gpu: list[MemoryRegion] = [r for r in memory.regions() if device_index(r.device) is not None]
    if not gpu:
        msg = (
            "the destination is GPU memory of the peer, but this side registered no GPU memory: register the "
            "source cache with its device (e.g. MemoryRegion(..., device='cuda:0'))"
        )
        raise TransferError(msg)
    gpu.sort(key=lambda r: r.addr)
    starts = np.array([r.addr for r in gpu], dtype=np.uint64)
    ends = starts + np.array([r.nbytes for r in gpu], dtype=np.uint64)
    idx = np.searchsorted(starts, src, side="right").astype(np.int64) - 1
    ok = idx >= 0
    ok[ok] = (src[ok] + lengths[ok]) <= ends[idx[ok]]
    if not ok.all():
        i = int(np.argmin(ok))
        msg = (
            f"source segment {i} (address 0x{int(src[i]):x}, {int(lengths[i])} bytes) is not inside registered GPU "
            "memory of this side; GPU-to-GPU frames must read registered device memory"
        )
        raise TransferError(msg)
    devices = {device_index(gpu[i].device) for i in np.unique(idx)}
    if len(devices) != 1:
        msg = f"one frame reads from several GPUs ({sorted(devices)}); send one frame per source GPU"
        raise TransferError(msg)
    return int(devices.pop())
