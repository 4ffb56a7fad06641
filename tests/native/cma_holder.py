"""A process that holds a buffer for cross-memory copies into it (entry point for spawned children)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def hold(q_out: Any, q_in: Any, nbytes: int) -> None:
    buf = np.zeros(nbytes, np.uint8)
    q_out.put((os.getpid(), buf.ctypes.data))
    q_in.get(timeout=60)  # the parent wrote: report what is here
    q_out.put(bytes(buf))
    q_in.get(timeout=60)
