"""The peer's exported virtual GPU memory, mapped in this process for one channel.

At handshake the channel receives one POSIX file descriptor per allocation the peer exported
(:mod:`~llumnix_kv_transport_shm.export`, :mod:`~llumnix_kv_transport_shm.fd_channel`),
imports and maps each on every GPU of this side that holds registered memory (where a frame's
sources, hence the copy kernel, can be), then closes the descriptors. The mappings live as long
as the channel: a reconnect maps the memory the peer exports then, and the old channel's
mappings are unmapped when it closes (or, for a channel that never started, when ``connect``
fails).
"""

from __future__ import annotations

import os
import threading

from llumnix_kv_core.errors import TransferError
from llumnix_kv_transport_shm.fd_channel import receive_fds
from llumnix_kv_transport_shm.ipc import PeerTable
from llumnix_kv_transport_shm.ipc import cuda_core


class VmmMappings:
    """(allocation index, device) -> (address, size) of the peer's allocations mapped here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mapped: dict[tuple[int, int], tuple[int, int]] = {}
        self._devices: list[int] = []

    def import_peer(self, peer: PeerTable, devices: list[int], timeout_s: float) -> None:
        """Take the descriptors of the peer's exported allocations and map them on ``devices``.

        A peer in this process needs no mapping (its pointers are ours); its descriptors are
        still taken, so that its offer ends at once. TransferError names what failed; nothing
        stays mapped then.
        """
        if not peer.allocations:
            return
        if not peer.fd_socket:
            msg = "the shm peer exported GPU memory but announced no descriptor socket; it runs another release"
            raise TransferError(msg)
        fds = receive_fds(peer.fd_socket, len(peer.allocations), peer.pid, timeout_s)
        try:
            if peer.pid != os.getpid():
                self._map(fds, peer.allocations, devices)
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, fds: list[int], sizes: tuple[int, ...], devices: list[int]) -> None:
        cuda = cuda_core()
        self._devices = list(devices)
        try:
            for index, (fd, size) in enumerate(zip(fds, sizes)):
                for device in devices:
                    try:
                        ptr = cuda.vmm_import(fd, size, device)
                    except RuntimeError as exc:
                        msg = (f"cannot map the shm peer's exported GPU memory (allocation {index}, {size} bytes) on "
                               f"cuda:{device}: {exc}")
                        raise TransferError(msg) from exc
                    with self._lock:
                        self._mapped[(index, device)] = (ptr, size)
        except BaseException:
            self.close()
            raise

    def base_of(self, index: int, device: int) -> int:
        """Address, in this process, of the peer's exported allocation ``index`` as mapped for ``device``."""
        with self._lock:
            got = self._mapped.get((index, device))
        if got is None:
            msg = (f"the shm peer's GPU memory (allocation {index}) was mapped at handshake for "
                   f"{[f'cuda:{d}' for d in self._devices]}, the GPUs of this side's registered memory; register "
                   f"the memory of cuda:{device} before connecting")
            raise TransferError(msg)
        return got[0]

    def close(self) -> None:
        """Unmap everything (no copy into these mappings may still run)."""
        with self._lock:
            mapped, self._mapped = self._mapped, {}
        if mapped:
            cuda = cuda_core()
            for (_index, device), (ptr, size) in mapped.items():
                cuda.set_device(device)
                cuda.vmm_unmap(ptr, size)
