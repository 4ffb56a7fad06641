"""Host-memory staging ring: one shared-memory file, pre-faulted, mapped once per channel direction.

The data sender creates the ring, the receiver maps it; the file is unlinked as soon as both
have it mapped, so nothing is left behind if either process dies. A DATA frame's payload (the
concatenation of its segments) moves chunk by chunk: the sender gathers chunk k into a free
slot while the receiver scatters chunk k-1 out of its slot, both with the native segment copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import uuid

import numpy as np

from llumnix_kv_core.errors import TransferError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)


class ShmRing:
    """``slots`` slots of ``slot_bytes`` bytes each, at ``addr`` in this process."""

    def __init__(self, path: str, slots: int, slot_bytes: int, *, create: bool) -> None:
        self.path = path
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.nbytes = slots * slot_bytes
        self.addr = 0
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            what = "create" if create else "open"
            msg = (
                f"cannot {what} the shared-memory ring {path}: {exc}. Both processes need the same writable "
                "tmpfs (same host and IPC namespace); set the shm transport option ring_dir to such a directory"
            )
            raise TransferError(msg) from exc
        try:
            if create:
                os.ftruncate(fd, self.nbytes)
            elif os.fstat(fd).st_size != self.nbytes:
                msg = f"shared-memory ring {path} is {os.fstat(fd).st_size} bytes, the peer announced {self.nbytes}"
                raise TransferError(msg)
            addr = _libc.mmap(None, self.nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED | _MAP_POPULATE, fd, 0)
            if addr in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                msg = f"cannot map the shared-memory ring {path} ({self.nbytes} bytes): {os.strerror(err)}"
                raise TransferError(msg)
            self.addr = int(addr)
        except BaseException:
            os.close(fd)
            if create:
                self.unlink()
            raise
        os.close(fd)
        if create:
            ctypes.memset(self.addr, 0, self.nbytes)  # allocate every page now, not during a transfer

    @classmethod
    def create(cls, directory: str, slots: int, slot_bytes: int) -> ShmRing:
        name = f"llumnix-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return cls(os.path.join(directory, name), slots, slot_bytes, create=True)

    def slot_addr(self, slot: int) -> int:
        return self.addr + slot * self.slot_bytes

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.nbytes)
            self.addr = 0


def is_ring_path(path: str, directory: str, pid: int) -> bool:
    """Whether ``path`` names a ring that process ``pid`` created in ``directory`` (see :meth:`ShmRing.create`)."""
    head, name = os.path.split(path)
    return head == os.path.normpath(directory) and re.fullmatch(rf"llumnix-kv-{pid}-[0-9a-f]{{12}}", name) is not None


def payload_starts(lengths: np.ndarray) -> np.ndarray:
    """Offset of each segment in the frame's payload (the concatenation of all segments)."""
    starts = np.zeros(len(lengths), dtype=np.uint64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def chunk_pieces(addrs: np.ndarray, starts: np.ndarray, lengths: np.ndarray, lo: int, hi: int):
    """The parts of the segments inside payload bytes ``[lo, hi)``.

    Returns (addresses of the parts on this side, their offsets inside the chunk, their lengths).
    """
    ends = starts + lengths
    i0 = int(np.searchsorted(ends, np.uint64(lo), side="right"))
    i1 = int(np.searchsorted(starts, np.uint64(hi), side="left"))
    s = starts[i0:i1]
    e = ends[i0:i1]
    a = np.maximum(s, np.uint64(lo))
    b = np.minimum(e, np.uint64(hi))
    keep = b > a
    a, b, s = a[keep], b[keep], s[keep]
    return addrs[i0:i1][keep] + (a - s), a - np.uint64(lo), b - a
