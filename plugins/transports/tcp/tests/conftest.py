from __future__ import annotations

import threading

import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser
from llumnix_kv_transport_tcp.transport import TcpTransport

from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import agents

D_BLOCKS = 48  # blocks of the decode cache in ``pair``


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


@pytest.fixture
def make_agent():
    """``make(layouts, signature, listen=False, connections=2, ...) -> KVAgent`` over tcp, closed after the test."""
    with agents(TcpTransport, "lkv-tcp") as make:
        yield make


@pytest.fixture
def pair(make_agent):
    """(P cache, P agent listening, D cache, D agent) with equal layouts and different contents."""
    parser = FlashAttnParser()
    p, d = KVCache(1, parser), KVCache(2, parser, blocks=D_BLOCKS)
    return p, make_agent([p.layout], p.signature(), listen=True), d, make_agent([d.layout], d.signature())
