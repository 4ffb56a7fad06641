"""GPU writes of the direct path: one gather/scatter kernel per frame through CUDA IPC.

The receiver's GPU regions come from its handshake, one export per allocation: exported virtual
memory, which the channel mapped at handshake (:class:`~llumnix_kv_transport_shm.vmm.VmmMappings`),
or a legacy IPC handle, which this process opens once per transport
(:class:`~llumnix_kv_transport_shm.ipc.IpcMappings`). It copies from its own registered GPU
memory on a stream of the channel, after the frame's ``ready_event`` (no host synchronisation),
then waits for an event recorded after the kernel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_transport_shm.ipc import IpcMappings
from llumnix_kv_transport_shm.ipc import PeerTable
from llumnix_kv_transport_shm.ipc import cuda_core
from llumnix_kv_transport_shm.ipc import device_index
from llumnix_kv_transport_shm.paths import Link
from llumnix_kv_transport_shm.paths import Outgoing
from llumnix_kv_transport_shm.vmm import VmmMappings

_SPIN_S = 5e-3  # busy-poll a GPU event (GIL released per query) this long before sleeping between polls


def peer_addresses(table: PeerTable, ipc: IpcMappings, vmm: VmmMappings, device: int) -> np.ndarray:
    """Base address, in this process, of every GPU region of the peer (0 for others), for copies on ``device``."""
    bases = np.zeros(len(table.kind), dtype=np.uint64)
    for rid, e in table.entries.items():
        if table.kind[rid] != 2:
            continue
        if table.pid == os.getpid():  # same process: CUDA refuses to open our own handle, use the pointer
            peer_device = device_index(str(e["device"]))
            if peer_device is not None and peer_device != device:
                cuda = cuda_core()
                cuda.set_device(device)
                cuda.device_enable_peer_access(peer_device)
            bases[rid] = int(e["addr"])
        elif "vmm" in e:
            bases[rid] = vmm.base_of(int(e["vmm"]), device) + int(e["offset"])
        else:
            bases[rid] = ipc.base_of(str(e["handle"]), device) + int(e["offset"])
    return bases


class GpuWriter:
    """The channel's copy stream and completion event on its source GPU, and the peer's mapped regions."""

    def __init__(self, link: Link, ipc: IpcMappings, vmm: VmmMappings) -> None:
        self._link = link
        self._ipc = ipc
        self._vmm = vmm
        self._peer_bases: dict[int, np.ndarray] = {}  # local device -> peer GPU region bases
        self._gpu: tuple[int, int, int] | None = None  # (device, stream, done event)

    def prepare(self, out: Outgoing, device: int) -> Callable[[], None]:
        """The write of ``out`` from ``device`` into the peer (data lock held); it returns once the kernel ran."""
        cuda, stream, done = self._stream_for(device)
        bases = self._peer_bases.get(device)
        if bases is None:
            bases = self._peer_bases[device] = peer_addresses(self._link.peer, self._ipc, self._vmm, device)
        dst = bases[out.regions] + out.offsets

        def write() -> None:
            if out.ready_event is not None:
                cuda.stream_wait_event(stream, out.ready_event)
            cuda.copy_segments(out.src, dst, out.lengths, stream)
            cuda.event_record(done, stream)
            self._wait_event(cuda, done, time.monotonic() + self._link.io_timeout)

        return write

    def _stream_for(self, device: int) -> tuple[Any, int, int]:
        cuda = native.cuda()
        cuda.set_device(device)
        if self._gpu is None or self._gpu[0] != device:
            if self._gpu is not None:
                msg = f"this channel already sends from cuda:{self._gpu[0]}; use one channel per source GPU"
                raise TransferError(msg)
            self._gpu = (device, cuda.stream_create(), cuda.event_create())
        return cuda, self._gpu[1], self._gpu[2]

    def _wait_event(self, cuda: Any, event: int, deadline: float) -> None:
        link = self._link
        t0 = time.monotonic()
        pause = 0.0
        while not cuda.event_query(event):
            now = time.monotonic()
            if link.closed:
                raise link.closed_error()
            if now > deadline:
                msg = f"GPU copy to shm peer {link.peer_name} did not finish within {link.io_timeout:g} s"
                raise TransferTimeoutError(msg)
            if now - t0 > _SPIN_S:
                pause = min(max(pause * 2, 20e-6), 1e-3)
                time.sleep(pause)

    def close(self) -> None:
        """Destroy the stream and event (data lock held)."""
        if self._gpu is not None:
            device, stream, event = self._gpu
            self._gpu = None
            cuda = native.cuda()
            cuda.set_device(device)
            cuda.stream_destroy(stream)
            cuda.event_destroy(event)
