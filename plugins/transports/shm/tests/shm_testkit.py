"""Helpers of the shm transport tests: the host-path options they run with, and leftover ring files."""

from __future__ import annotations

import os
import queue
from typing import Any

import pytest

from llumnix_kv_core import native

__all__ = ["CMA", "PATHS", "SMALL_RING", "child_message", "needs_cma", "reap", "ring_files"]

SMALL_RING = (("host_path", "ring"), ("slot_bytes", 1 << 20), ("slots", 3))
CMA = (("host_path", "cma"),)
needs_cma = pytest.mark.skipif(not native.has("cma"), reason="cross-memory copies need the compiled core")
PATHS = ["ring", pytest.param("cma", marks=needs_cma)]


def ring_files(pid: int | None = None, directory: str = "/dev/shm") -> list[str]:
    """Ring files of process ``pid`` (default: this one) still present in ``directory``."""
    prefix = f"llumnix-kv-{os.getpid() if pid is None else pid}-"
    return [f for f in os.listdir(directory) if f.startswith(prefix)]


def child_message(q: Any, what: str, timeout: float) -> tuple:
    """The next message a spawned child put on ``q``; the test fails if none comes or the child failed."""
    try:
        msg = q.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no {what} message within {timeout} s")
    if msg[0] == "error":
        pytest.fail(f"child process failed:\n{msg[1]}")
    return msg


def reap(*procs: Any, timeout: float = 20.0) -> None:
    """Join spawned children, killing those still alive after ``timeout`` seconds."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5)
