from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

# The kits here (shm_testkit; gpu_testkit, whose functions spawned GPU processes run) must be
# importable by name, also in processes started with the spawn method, which inherit sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from llumnix_kv_transport_shm.transport import ShmTransport  # noqa: E402

from llumnix_kv_core.interfaces.transport import TransportConfig  # noqa: E402


@pytest.fixture
def make_transport():
    """Build shm transports that are closed (and their threads checked) after the test."""
    made: list[ShmTransport] = []

    def make(**kw) -> ShmTransport:
        kw.setdefault("connect_timeout_s", 5.0)
        kw.setdefault("io_timeout_s", 10.0)
        extra = kw.pop("extra", {})
        t = ShmTransport(TransportConfig(extra=tuple(sorted(extra.items())), **kw))
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
    for th in threading.enumerate():
        if th.name.startswith("lkv-shm"):
            th.join(5.0)
    left = [th.name for th in threading.enumerate() if th.name.startswith("lkv-shm")]
    assert not left, f"threads still running after close: {left}"
