"""Registered memory: segment translation and its bounds checks."""

from __future__ import annotations

import numpy as np
import pytest

from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry

U64_MAX = 2**64 - 1


def u64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


@pytest.fixture
def memory() -> MemoryRegistry:
    m = MemoryRegistry()
    m.register(MemoryRegion(0, 0x10000, 4096))
    m.register(MemoryRegion(2, 0x40000, 100))  # region 1 is a hole
    return m


def test_resolve_translates(memory):
    out = memory.resolve(u64(0, 2, 0, 2), u64(0, 10, 4000, 0), u64(4096, 90, 96, 100))
    assert out.dtype == np.uint64
    assert out.tolist() == [0x10000, 0x4000A, 0x10000 + 4000, 0x40000]
    assert memory.resolve(u64(), u64(), u64()).tolist() == []


@pytest.mark.parametrize("region", [1, 3, 2**40])
def test_unregistered_region(memory, region):
    with pytest.raises(FrameError, match=rf"memory region {region}, which this side never registered"):
        memory.resolve(u64(0, region), u64(0, 0), u64(1, 1))


def test_unregister(memory):
    memory.unregister(2)
    with pytest.raises(FrameError, match=r"region 2, which this side never registered"):
        memory.resolve(u64(2), u64(0), u64(1))
    assert [r.region_id for r in memory.regions()] == [0]


@pytest.mark.parametrize(
    ("region", "offset", "length"),
    [(0, 0, 4097), (0, 4096, 1), (0, 4000, 97), (2, 99, 2), (2, 101, 0), (0, U64_MAX, 0)],
)
def test_overrun(memory, region, offset, length):
    with pytest.raises(FrameError, match=rf"segment 1 \[{offset}, \+{length}\) overruns region {region}"):
        memory.resolve(u64(0, region), u64(0, offset), u64(8, length))


@pytest.mark.parametrize(
    ("offset", "length"),
    [(U64_MAX, 1), (U64_MAX - 10, 20), (1, U64_MAX), (2**63, 2**63), (2**63 + 5, 2**63)],
)
def test_offset_plus_length_overflow(memory, offset, length):
    # offset + length wraps around 2**64 to something small: must still be refused
    assert (offset + length) % 2**64 <= 4096
    with pytest.raises(FrameError, match=r"overruns region 0"):
        memory.resolve(u64(0), u64(offset), u64(length))


def test_register_conflicts(memory):
    memory.register(MemoryRegion(0, 0x10000, 4096))  # the same region again is fine
    with pytest.raises(ValueError, match=r"memory region 0 is already registered"):
        memory.register(MemoryRegion(0, 0x20000, 4096))
    assert memory.get(0).addr == 0x10000


def test_resolve_100k_segments_vectorised():
    rng = np.random.default_rng(7)
    m = MemoryRegistry()
    sizes = {rid: int(rng.integers(1 << 20, 1 << 30)) for rid in (0, 1, 3, 7, 12)}
    bases = {rid: (rid + 1) << 40 for rid in sizes}
    for rid in sizes:
        m.register(MemoryRegion(rid, bases[rid], sizes[rid]))
    n = 100_000
    ids = np.array(sorted(sizes), dtype=np.uint64)
    regions = ids[rng.integers(0, len(ids), n)]
    size_of = np.array([sizes[int(r)] for r in ids], dtype=np.uint64)[np.searchsorted(ids, regions)]
    lengths = rng.integers(0, 1 << 16, n).astype(np.uint64)
    offsets = (rng.random(n) * (size_of - lengths).astype(np.float64)).astype(np.uint64)
    # put a few segments exactly at the end of their region
    offsets[:10] = size_of[:10] - lengths[:10]
    out = m.resolve(regions, offsets, lengths)
    expected = [bases[int(r)] + int(o) for r, o in zip(regions.tolist(), offsets.tolist())]
    assert out.tolist() == expected
    # one bad segment among 100k is found and named
    lengths[54321] = size_of[54321] - offsets[54321] + 1
    with pytest.raises(FrameError, match=r"segment 54321 "):
        m.resolve(regions, offsets, lengths)
