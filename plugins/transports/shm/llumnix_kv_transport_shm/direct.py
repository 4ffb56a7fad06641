"""The direct path: the sender writes a frame's payload straight into the receiver's memory.

Host memory moves in one copy by the kernel (Linux cross-memory attach, ``process_vm_writev``,
the native ``cma_copy`` split over threads); GPU memory by one gather/scatter kernel through
this process's mapping of the receiver's memory (exported virtual memory or a legacy CUDA IPC
handle; :mod:`llumnix_kv_transport_shm.gpu`).

Since the receiver does not write, it fences the frame with two messages (TRANSPORT frames):
the header and table arrive first, the receiver checks them and answers ``go`` (``ok``: accepted,
else refused); the sender writes only after an accepting ``go``, waits until the bytes are in
place, then sends ``end``. The receiver counts the frame only on ``end``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_transport_shm.gpu import GpuWriter
from llumnix_kv_transport_shm.ipc import IpcMappings
from llumnix_kv_transport_shm.ipc import PeerTable
from llumnix_kv_transport_shm.ipc import local_gpu_sources
from llumnix_kv_transport_shm.local import ShmOptions
from llumnix_kv_transport_shm.paths import F_CMA
from llumnix_kv_transport_shm.paths import F_IPC
from llumnix_kv_transport_shm.paths import Incoming
from llumnix_kv_transport_shm.paths import Link
from llumnix_kv_transport_shm.paths import Outgoing
from llumnix_kv_transport_shm.vmm import VmmMappings


def cma_unreachable(peer: PeerTable) -> str | None:
    """None if this process can copy into the peer's registered host memory, else why not."""
    if not native.has("cma"):
        return "the compiled core lacks cross-memory copies"
    probe = next((int(a) for a in peer.host_addresses() if a), 0)
    if not probe or peer.pid <= 0:
        return "the peer announced no host memory"
    scratch = np.zeros(1, np.uint8)
    try:  # a one-byte read: the same permission check as a write, and harmless
        native.cma_copy(peer.pid, False, np.array([scratch.ctypes.data], np.uint64),
                        np.array([probe], np.uint64), np.ones(1, np.uint64), 1)
    except OSError as exc:
        return str(exc)
    return None


def check_fits(peer: PeerTable, regions: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> None:
    """ValueError unless every segment lies inside the peer's region it names."""
    ends = offsets + lens
    sizes = peer.nbytes[regions]
    over = (ends > sizes) | (ends < offsets)
    if over.any():
        i = int(np.argmax(over))
        msg = (f"segment {i} [{int(offsets[i])}, +{int(lens[i])}) overruns region {int(regions[i])} of the peer "
               f"({int(sizes[i])} bytes)")
        raise ValueError(msg)


class DirectPath:
    """Frames this side writes into the peer (host: cross-memory attach, GPU: CUDA IPC), and theirs into it."""

    ops = frozenset({"go", "end"})

    def __init__(self, link: Link, memory: MemoryRegistry, options: ShmOptions, ipc: IpcMappings,
                 vmm: VmmMappings) -> None:
        self._link = link
        self._memory = memory
        self._options = options
        self._go: bool | None = None  # the receiver's answer to the frame being sent
        self._gpu = GpuWriter(link, ipc, vmm)

    # -- sending -----------------------------------------------------------------------------
    def send(self, out: Outgoing) -> int:
        """Returns once the bytes are in place (GPU: the kernel finished) and the receiver was told."""
        peer = self._link.peer
        if out.gpu:
            device = local_gpu_sources(self._memory, out.src, out.lengths)
            check_fits(peer, out.regions, out.offsets, out.lengths)
            frame = out.frame(F_IPC)
            with self._link.data_lock:
                self._fenced(frame, "accept the GPU frame", self._gpu.prepare(out, device))
            return out.total
        check_fits(peer, out.regions, out.offsets, out.lengths)
        dst = peer.host_addresses()[out.regions] + out.offsets
        frame = out.frame(F_CMA)
        pid, threads = peer.pid, self._options.cma_threads
        with self._link.data_lock:
            self._fenced(frame, "accept the frame",
                         lambda: native.cma_copy(pid, True, out.src, dst, out.lengths, threads))
        return out.total

    def _fenced(self, frame: bytes, what: str, write: Callable[[], object]) -> None:
        """Header and table, ``write`` once the receiver says ``go``, then ``end`` (data lock held).

        Nothing is written on ``go: false``. A failure after the header fails the channel.
        """
        link = self._link
        with link.cond:
            self._go = None
        link.send_frame(frame)
        try:
            link.wait(lambda: self._go is not None, what)
            if self._go:
                write()
            link.post("end")
        except BaseException as exc:
            link.abort(exc)
            raise

    # -- receiving (receive thread) ----------------------------------------------------------
    def receive(self, inc: Incoming) -> None:
        self._link.reply("go", ok=inc.accepted)

    def on_message(self, op: str, body: dict[str, Any], inc: Incoming | None) -> None:
        if op == "go":
            with self._link.cond:
                self._go = bool(body.get("ok"))
                self._link.cond.notify_all()
            return
        if inc is None or inc.mode not in (F_IPC, F_CMA):
            msg = "'end' without a directly written frame in progress"
            raise FrameError(msg)
        self._link.complete(inc)

    # -- release -----------------------------------------------------------------------------
    def close_receiving(self) -> None:
        """Nothing: the peer writes, this side only counts."""

    def close_sending(self) -> None:
        self._gpu.close()

