"""Registered memory: the only places a receiver will write into."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from llumnix_kv_core.errors import FrameError


@dataclass(frozen=True)
class MemoryRegion:
    """A registered range of memory: ``nbytes`` bytes at ``addr`` on ``device``."""

    region_id: int
    addr: int
    nbytes: int
    device: str = "cpu"


class MemoryRegistry:
    """Region table used to translate (region, offset, length) segments into addresses.

    Translation is vectorised: a frame of thousands of segments is checked and
    resolved with a handful of NumPy operations, never a Python loop per block.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, MemoryRegion] = {}
        self._bases = np.zeros(0, dtype=np.uint64)
        self._sizes = np.zeros(0, dtype=np.uint64)

    def register(self, region: MemoryRegion) -> None:
        with self._lock:
            old = self._regions.get(region.region_id)
            if old is not None and old != region:
                msg = f"memory region {region.region_id} is already registered as {old}"
                raise ValueError(msg)
            self._regions[region.region_id] = region
            self._rebuild()

    def unregister(self, region_id: int) -> None:
        with self._lock:
            self._regions.pop(region_id, None)
            self._rebuild()

    def _rebuild(self) -> None:
        n = max(self._regions, default=-1) + 1
        bases = np.zeros(n, dtype=np.uint64)
        sizes = np.zeros(n, dtype=np.uint64)
        for rid, r in self._regions.items():
            bases[rid] = r.addr
            sizes[rid] = r.nbytes
        self._bases, self._sizes = bases, sizes

    def regions(self) -> list[MemoryRegion]:
        with self._lock:
            return sorted(self._regions.values(), key=lambda r: r.region_id)

    def get(self, region_id: int) -> MemoryRegion:
        with self._lock:
            return self._regions[region_id]

    def resolve(self, regions: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Absolute addresses for segments; FrameError if any falls outside its region."""
        bases, sizes = self._bases, self._sizes
        regions = regions.astype(np.uint64, copy=False)
        if len(regions) == 0:
            return np.zeros(0, dtype=np.uint64)
        bad_id = regions >= len(bases)
        if not bad_id.any():
            bad_id = sizes[regions] == 0
        if bad_id.any():
            rid = int(regions[np.argmax(bad_id)])
            msg = f"segment names memory region {rid}, which this side never registered"
            raise FrameError(msg)
        end = offsets + lengths
        over = (end > sizes[regions]) | (end < offsets)
        if over.any():
            i = int(np.argmax(over))
            msg = (
                f"segment {i} [{int(offsets[i])}, +{int(lengths[i])}) overruns region {int(regions[i])} "
                f"of {int(sizes[regions[i]])} bytes: the peer's layout does not match this side's"
            )
            raise FrameError(msg)
        return bases[regions] + offsets
