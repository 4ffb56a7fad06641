"""Addresses, options, connection failures and plugin registration."""

from __future__ import annotations

import socket
import time
from importlib.metadata import entry_points

import pytest
from llumnix_kv_transport_tcp import plugin
from llumnix_kv_transport_tcp.sockets import TcpOptions
from llumnix_kv_transport_tcp.transport import TcpTransport

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import Registry
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.providers import TransportProvider
from llumnix_kv_core.streams.sockets import format_address
from llumnix_kv_core.streams.sockets import parse_address
from llumnix_kv_core.testing.frames import Recorder


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:5555", ("127.0.0.1", 5555)),
    ("[::1]:5555", ("::1", 5555)),
    ("[fe80::1%eth0]:0", ("fe80::1%eth0", 0)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_address(text, want):
    assert parse_address(text, "tcp") == want
    assert format_address(*want) == text


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:5555", "[::1]5555", "host:port", "h:70000", ":80",
                                  "[]:1"])
def test_bad_address_is_explained(text):
    with pytest.raises(TransferError, match="expected host:port"):
        parse_address(text, "tcp")


def test_options_from_extra():
    assert TcpOptions.from_extra((("socket_buffer_bytes", "0"),)).socket_buffer_bytes == 0
    with pytest.raises(ValueError, match="unknown tcp transport option"):
        TcpOptions.from_extra((("sndbuf", 1),))
    with pytest.raises(ValueError, match="connections_per_peer"):
        TcpTransport(TransportConfig(connections_per_peer=0))


def test_refused_connection_is_quick_and_clear(make_transport):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on that port now
    t = make_transport()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="refused") as info:
        t.connect(f"127.0.0.1:{port}", Recorder(), MemoryRegistry())
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg
    assert "check that the peer is running" in msg


def test_connect_timeout_against_a_full_backlog(make_transport):
    """A listener that never accepts and whose backlog is full drops SYNs: connect times out."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    addr = lsock.getsockname()
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue
            f = socket.socket()
            f.settimeout(0.3)
            try:
                f.connect(addr)
            except OSError:
                f.close()
                break
            fillers.append(f)
        t = make_transport(connect_timeout_s=0.5)
        t0 = time.monotonic()
        err: BaseException | None = None
        try:
            t.connect(f"127.0.0.1:{addr[1]}", Recorder(), MemoryRegistry())
        except TransferTimeoutError as exc:
            err = exc
        if err is None:  # pragma: no cover - depends on the kernel's SYN handling
            pytest.skip("the kernel completed the handshake despite the full backlog")
        assert time.monotonic() - t0 < 5
        assert f"127.0.0.1:{addr[1]}" in str(err)
        assert "timed out" in str(err)
    finally:
        for f in fillers:
            f.close()
        lsock.close()


def test_plugin_registers_the_tcp_transport():
    providers = plugin.llumnix_kv_register_transports()
    assert [p.name for p in providers] == ["tcp"]
    assert isinstance(providers[0], TransportProvider)
    t = providers[0].factory(TransportConfig())
    try:
        assert isinstance(t, TcpTransport)
        assert t.name == "tcp"
    finally:
        t.close()


def test_entry_point_when_installed():
    eps = [ep for ep in entry_points(group="llumnix_kv") if ep.name == "transport-tcp"]
    if not eps:
        pytest.skip("llumnix-kv is not installed in this environment (running from the source tree)")
    assert eps[0].value == "llumnix_kv_transport_tcp.plugin"
    reg = build_registry(eps)
    assert reg.transport("tcp").name == "tcp"


def test_plugin_loads_through_the_registry():
    reg = Registry()
    reg.register_module(plugin, "transport-tcp", ("llumnix-kv", "test"))
    provider = reg.transport("tcp")
    assert provider.remote
    rec = next(r for r in reg.records if r.name == "tcp")
    assert rec.status == "loaded"
