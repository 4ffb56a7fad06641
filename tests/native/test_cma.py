"""native.cma_copy: single-copy transfers into and out of another process of this host."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np
import pytest

from llumnix_kv_core import native

# The child's entry point must be importable by name in a spawned process (which inherits sys.path,
# not the test runner's way of importing this file).
sys.path.insert(0, os.path.dirname(__file__))
from cma_holder import hold

pytestmark = pytest.mark.skipif(not native.has("cma"), reason="needs the compiled core (cross-memory copies)")

CTX = mp.get_context("spawn")


@pytest.mark.parametrize("threads", [1, 0])
def test_scattered_write_then_read_across_processes(threads):
    nbytes = 8 << 20
    q_out, q_in = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=hold, args=(q_out, q_in, nbytes), daemon=True)
    p.start()
    try:
        pid, base = q_out.get(timeout=60)
        rng = np.random.default_rng(threads)
        src = rng.integers(0, 256, nbytes, dtype=np.uint8)
        n, block = 1000, 4096
        lens = rng.integers(1, block + 1, n).astype(np.uint64)  # unaligned lengths
        s_off = rng.permutation(nbytes // block)[:n].astype(np.uint64) * np.uint64(block)
        d_off = rng.permutation(nbytes // block)[:n].astype(np.uint64) * np.uint64(block)
        moved = native.cma_copy(pid, True, np.uint64(src.ctypes.data) + s_off, np.uint64(base) + d_off, lens, threads)
        assert moved == int(lens.sum())
        q_in.put("report")
        there = np.frombuffer(q_out.get(timeout=60), np.uint8)
        want = np.zeros(nbytes, np.uint8)
        for s, d, k in zip(s_off.tolist(), d_off.tolist(), lens.tolist()):
            want[d:d + k] = src[s:s + k]
        np.testing.assert_array_equal(there, want)
        back = np.zeros(nbytes, np.uint8)
        native.cma_copy(pid, False, np.uint64(back.ctypes.data) + d_off, np.uint64(base) + d_off, lens, threads)
        for d, k in zip(d_off.tolist(), lens.tolist()):
            assert (back[d:d + k] == want[d:d + k]).all()
    finally:
        q_in.put("stop")
        p.join(10)


def test_errors_name_the_call_and_the_cause():
    buf = np.zeros(64, np.uint8)
    one = np.array([buf.ctypes.data], np.uint64)
    with pytest.raises(OSError, match=r"process_vm_writev.*Bad address") as bad:
        native.cma_copy(os.getpid(), True, one, np.array([8], np.uint64), np.array([16], np.uint64))
    assert bad.value.errno == 14
    p = CTX.Process(target=os.getpid)
    p.start()
    p.join(10)
    with pytest.raises(ProcessLookupError):
        native.cma_copy(p.pid, True, one, one, np.array([16], np.uint64))
    with pytest.raises(ValueError, match="pid"):
        native.cma_copy(0, True, one, one, np.array([16], np.uint64))
