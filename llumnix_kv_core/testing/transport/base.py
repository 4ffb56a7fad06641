"""What every part of the conformance suite shares: the transport under test, its hooks, fixtures, pairs."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.wire import Kind


@dataclass(frozen=True)
class TransportSpec:
    """How to build the transport under test, also in a spawned process (the spec is pickled).

    ``factory`` (a class or a module-level function, pickled by reference) builds it; without
    one, the provider ``name`` of the plugin registry does.
    """

    name: str
    factory: Callable[[TransportConfig], Transport] | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def build(self, **config: Any) -> Transport:
        cfg = TransportConfig(extra=self.extra, **config)
        if self.factory is not None:
            return self.factory(cfg)
        return get_registry().transport(self.name).factory(cfg)


@dataclass
class Pair:
    """A listening transport and a peer connected to it, each side with a recording handler."""

    server: Transport
    client: Transport
    address: str
    shand: Recorder
    chand: Recorder
    smem: MemoryRegistry
    cmem: MemoryRegistry
    peer: Peer
    sbufs: dict[int, np.ndarray] = field(default_factory=dict)  # registered before connecting
    cbufs: dict[int, np.ndarray] = field(default_factory=dict)

    def server_channel(self, key: int = 0) -> Channel:
        """The accepted channel the peer's channel ``key`` talks to (found by a HELLO)."""
        tid = wire.new_transfer_id()
        self.peer.channel_for(key).send_control(Kind.HELLO, tid, {"key": key})
        want = bytes.fromhex(tid)
        self.shand.wait(lambda r: any(t == want for _, _, t, _ in r.controls))
        return next(c for c, _, t, _ in self.shand.controls if t == want)


class ConformanceBase:
    """The transport under test and how it differs from the others (attributes and hooks).

    A subclass sets ``transport_name`` and, where its transport differs, the attributes below;
    every test of the suite reads them instead of asking which transport it runs.
    """

    #: Provider name in the plugin registry; every error message of the transport names it.
    transport_name: str = ""
    #: Builds a transport that is not registered (a class or module-level function: it is pickled).
    transport_factory: Callable[[TransportConfig], Transport] | None = None
    #: ``TransportConfig.extra`` of every transport the suite builds.
    options: Mapping[str, Any] = {}
    #: Capability: a listener can be reached from another process (multi-process tests).
    supports_processes = True
    #: Capability: a listening address takes raw TCP connections speaking the wire format.
    raw_socket_frames = True
    #: ``send_data`` itself refuses segments outside the peer's announced regions (ValueError);
    #: otherwise the receiver refuses the frame with an ERROR frame and closes the channel.
    sender_checks_regions = False
    #: Text of the ERROR frame a refused peer gets, besides the cause (how to fix it).
    refusal_hint = "Fix:"
    #: Regex the receiver's close error matches when the sender died in the middle of a frame.
    killed_sender_error = "middle of a frame"
    #: Regex of the address ``listen("127.0.0.1", 0, ...)`` returns.
    address_pattern = r"127\.0\.0\.1:[1-9][0-9]*"
    #: How long the transport's threads may take to end after it closed.
    threads_settle_s = 0.0

    # -- hooks -------------------------------------------------------------------------------
    def spec(self) -> TransportSpec:
        assert self.transport_name, f"{type(self).__name__} must set transport_name"
        return TransportSpec(self.transport_name, type(self).transport_factory, tuple(sorted(self.options.items())))

    def dead_address(self) -> str:
        """An address nobody listens on."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused

    def check_process_left_nothing(self, pid: int) -> None:
        """After process ``pid`` (a sender or receiver of the multi-process tests) ended."""

    def require(self, capability: str) -> None:
        """Skip, saying so, unless the transport declares ``capability``."""
        if not getattr(self, capability):
            pytest.skip(f"the {self.transport_name} transport declares {capability} = False")

    # -- fixtures and helpers ----------------------------------------------------------------
    def threads_left(self) -> list[str]:
        prefix = f"lkv-{self.transport_name}"
        deadline = time.monotonic() + self.threads_settle_s
        for th in threading.enumerate():
            if th.name.startswith(prefix):
                th.join(max(0.0, deadline - time.monotonic()))
        return [th.name for th in threading.enumerate() if th.name.startswith(prefix)]

    @pytest.fixture
    def make_transport(self):
        """``make(**config)``: transports closed after the test, whose threads must all have ended."""
        made: list[Transport] = []
        spec = self.spec()

        def make(**kw: Any) -> Transport:
            kw.setdefault("connect_timeout_s", 5.0)
            kw.setdefault("io_timeout_s", 10.0)
            t = spec.build(**kw)
            made.append(t)
            return t

        yield make
        for t in made:
            t.close()
        left = self.threads_left()
        assert not left, f"threads still running after close: {left}"

    def connect_pair(self, make_transport: Callable[..., Transport], *, connections: int = 3,
                     server_regions: Mapping[int, int] | None = None, client_regions: Mapping[int, int] | None = None,
                     fill: int = 0, shand: Recorder | None = None, chand: Recorder | None = None,
                     client_config: Mapping[str, Any] | None = None, **server_config: Any) -> Pair:
        """A server listening on 127.0.0.1 and a peer of ``connections`` channels to it.

        ``server_regions`` / ``client_regions`` (region id -> bytes, filled with ``fill``) are
        registered before connecting: some transports announce them at the handshake.
        ``server_config`` / ``client_config`` are TransportConfig fields of either side.
        """
        server = make_transport(**server_config)
        client = make_transport(connections_per_peer=connections, **(client_config or {}))
        smem, cmem = MemoryRegistry(), MemoryRegistry()
        sbufs = {rid: registered(smem, rid, n, fill) for rid, n in (server_regions or {}).items()}
        cbufs = {rid: registered(cmem, rid, n, fill) for rid, n in (client_regions or {}).items()}
        shand, chand = shand or Recorder(), chand or Recorder()
        address = server.listen("127.0.0.1", 0, shand, smem)
        peer = client.connect(address, chand, cmem)
        return Pair(server, client, address, shand, chand, smem, cmem, peer, sbufs, cbufs)

    def assert_names_transport(self, error: BaseException | str) -> None:
        assert re.search(rf"\b{re.escape(self.transport_name)}\b", str(error)), (
            f"the message does not name the {self.transport_name} transport: {error}")


def one_segment(src: np.ndarray, region: int, offset: int = 0,
                nbytes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``send_data``'s arrays for one segment: ``nbytes`` (default all) of ``src`` to ``offset`` of ``region``."""
    n = src.nbytes if nbytes is None else nbytes
    return (np.array([src.ctypes.data], np.uint64), np.array([region], np.uint64), np.array([offset], np.uint64),
            np.array([n], np.uint64))
