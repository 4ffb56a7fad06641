"""Helpers of the shm transport tests: the host-path options they run with, and leftover ring files."""

from __future__ import annotations

import os

import pytest

from llumnix_kv_core import native

__all__ = ["CMA", "PATHS", "SMALL_RING", "needs_cma", "ring_files"]

SMALL_RING = (("host_path", "ring"), ("slot_bytes", 1 << 20), ("slots", 3))
CMA = (("host_path", "cma"),)
needs_cma = pytest.mark.skipif(not native.has("cma"), reason="cross-memory copies need the compiled core")
PATHS = ["ring", pytest.param("cma", marks=needs_cma)]


def ring_files(pid: int | None = None, directory: str = "/dev/shm") -> list[str]:
    """Ring files of process ``pid`` (default: this one) still present in ``directory``."""
    prefix = f"llumnix-kv-{os.getpid() if pid is None else pid}-"
    return [f for f in os.listdir(directory) if f.startswith(prefix)]
