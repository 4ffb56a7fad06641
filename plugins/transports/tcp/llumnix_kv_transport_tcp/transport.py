"""The TCP transport: listeners with an accept thread, peers of several connections.

Every connection is a :class:`~llumnix_kv_transport_tcp.channel.TcpChannel` with its
own receive thread. Channels are bidirectional: the listening side answers on the
channel it accepted, so DATA may flow either way on any channel.
"""

from __future__ import annotations

import logging
import socket
import threading

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_transport_tcp.channel import TcpChannel
from llumnix_kv_transport_tcp.sockets import TcpOptions
from llumnix_kv_transport_tcp.sockets import format_address
from llumnix_kv_transport_tcp.sockets import open_connection
from llumnix_kv_transport_tcp.sockets import open_listener
from llumnix_kv_transport_tcp.sockets import sockaddr_str
from llumnix_kv_transport_tcp.sockets import tune

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.5
_JOIN_S = 10.0


class TcpPeer(Peer):
    """The channels one ``connect`` opened to ``address`` (closed channels stay in place)."""

    def __init__(self, address: str, channels: list[TcpChannel]) -> None:
        self.address = address
        self._channels: list[Channel] = list(channels)

    @property
    def channels(self) -> list[Channel]:
        return list(self._channels)

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self._channels)

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __repr__(self) -> str:
        return f"<TcpPeer {self.address} channels={len(self._channels)}>"


class _Listener:
    def __init__(self, transport: TcpTransport, sock: socket.socket, address: str,
                 handler: FrameHandler, memory: MemoryRegistry) -> None:
        self.transport = transport
        self.sock = sock
        self.address = address
        self.handler = handler
        self.memory = memory
        self.stopping = False
        sock.settimeout(_ACCEPT_POLL_S)
        self.thread = threading.Thread(target=self._accept_loop, name=f"lkv-tcp-accept {address}",
                                       daemon=True)

    def _accept_loop(self) -> None:
        t = self.transport
        try:
            while not self.stopping:
                try:
                    conn, addr = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self.stopping:
                        break
                    log.warning("tcp listener %s: accept failed: %s", self.address, exc)
                    threading.Event().wait(0.1)  # e.g. out of descriptors: do not spin
                    continue
                try:
                    tune(conn, t.options)
                    ch = TcpChannel(conn, sockaddr_str(addr), self.handler, self.memory,
                                    t.config.io_timeout_s, on_exit=t._forget)
                except OSError as exc:
                    log.warning("tcp listener %s: cannot set up connection from %s: %s",
                                self.address, addr, exc)
                    conn.close()
                    continue
                if not t._adopt(ch):
                    conn.close()
                    break
                ch.start()
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self.thread:
            self.thread.join(_JOIN_S)


class TcpTransport(Transport):
    """Frames over TCP sockets. Options in ``config.extra``: see :class:`TcpOptions`."""

    name = "tcp"

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        if config.connections_per_peer < 1:
            msg = f"connections_per_peer must be at least 1, got {config.connections_per_peer}"
            raise ValueError(msg)
        if not (config.io_timeout_s > 0 and config.connect_timeout_s > 0):
            msg = (
                f"io_timeout_s and connect_timeout_s must be positive seconds, got {config.io_timeout_s} "
                f"and {config.connect_timeout_s}"
            )
            raise ValueError(msg)
        self.options = TcpOptions.from_extra(config.extra)
        self._lock = threading.Lock()
        self._closed = False
        self._listeners: list[_Listener] = []
        self._channels: set[TcpChannel] = set()
        self._peers: list[TcpPeer] = []

    def __repr__(self) -> str:
        return f"<TcpTransport listening={self.addresses} channels={len(self._channels)}>"

    def _check_open(self) -> None:
        if self._closed:
            msg = "this tcp transport is closed; build a new one from its provider"
            raise TransferError(msg)

    def _adopt(self, ch: TcpChannel) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._channels.add(ch)
            return True

    def _forget(self, ch: TcpChannel) -> None:
        with self._lock:
            self._channels.discard(ch)

    @property
    def addresses(self) -> list[str]:
        """The addresses this transport listens on."""
        return [x.address for x in self._listeners]

    def listen(self, host: str, port: int, handler: FrameHandler, memory: MemoryRegistry) -> str:
        """Listen on ``host:port`` (port 0: ephemeral); returns the bound address as ``host:port``.

        A wildcard host (``""``, ``0.0.0.0``, ``::``) returns the wildcard address; peers on
        other hosts must be given one of this host's real addresses instead.
        """
        self._check_open()
        sock = open_listener(host, port, self.options)
        bound = sock.getsockname()
        address = format_address(bound[0], bound[1])
        lst = _Listener(self, sock, address, handler, memory)
        with self._lock:
            if self._closed:
                sock.close()
                self._check_open()
            self._listeners.append(lst)
        lst.thread.start()
        return address

    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> TcpPeer:
        self._check_open()
        socks: list[socket.socket] = []
        try:
            for _ in range(self.config.connections_per_peer):
                socks.append(open_connection(address, self.config.connect_timeout_s, self.options))
        except BaseException:
            for s in socks:
                s.close()
            raise
        chans = [TcpChannel(s, address, handler, memory, self.config.io_timeout_s, on_exit=self._forget)
                 for s in socks]
        peer = TcpPeer(address, chans)
        with self._lock:
            adopted = not self._closed
            if adopted:
                self._channels.update(chans)
                self._peers.append(peer)
        if not adopted:
            for s in socks:
                s.close()
            self._check_open()
        for ch in chans:
            ch.start()
        return peer

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners, self._listeners = self._listeners, []
            channels = list(self._channels)
            self._peers = []
        for lst in listeners:
            lst.stop()
        for ch in channels:
            ch.close()
