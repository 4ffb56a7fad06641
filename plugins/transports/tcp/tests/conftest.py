from __future__ import annotations

import threading

import pytest
from llumnix_kv_transport_tcp.transport import TcpTransport

from llumnix_kv_core.interfaces.transport import TransportConfig


@pytest.fixture
def make_transport():
    """Build transports that are closed (and their threads checked) after the test."""
    made: list[TcpTransport] = []

    def make(**kw) -> TcpTransport:
        kw.setdefault("connect_timeout_s", 5.0)
        kw.setdefault("io_timeout_s", 10.0)
        t = TcpTransport(TransportConfig(**kw))
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
    left = [th.name for th in threading.enumerate() if th.name.startswith("lkv-tcp")]
    assert not left, f"threads still running after close: {left}"
