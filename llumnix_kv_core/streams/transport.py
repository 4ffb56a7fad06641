"""Listeners with an accept thread, and peers of several channels, for socket-based transports.

Every connection is a :class:`~llumnix_kv_core.streams.channel.StreamChannel` with its own
receive thread. Channels are bidirectional: the listening side answers on the channel it
accepted, so DATA may flow either way on any channel.
"""

from __future__ import annotations

import abc
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
from llumnix_kv_core.streams.channel import JOIN_S
from llumnix_kv_core.streams.channel import StreamChannel
from llumnix_kv_core.streams.sockets import SocketOptions
from llumnix_kv_core.streams.sockets import format_address
from llumnix_kv_core.streams.sockets import open_connection
from llumnix_kv_core.streams.sockets import open_listener
from llumnix_kv_core.streams.sockets import sockaddr_str
from llumnix_kv_core.streams.sockets import tune

_ACCEPT_POLL_S = 0.5


class StreamPeer(Peer):
    """The channels one ``connect`` opened to ``address`` (closed channels stay in place)."""

    def __init__(self, address: str, channels: list[StreamChannel]) -> None:
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
        return f"<{type(self).__name__} {self.address} channels={len(self._channels)}>"


class _Listener:
    def __init__(self, transport: StreamTransport, sock: socket.socket, address: str,
                 handler: FrameHandler, memory: MemoryRegistry) -> None:
        self.transport = transport
        self.sock = sock
        self.address = address
        self.handler = handler
        self.memory = memory
        self.stopping = False
        sock.settimeout(_ACCEPT_POLL_S)
        self.thread = threading.Thread(target=self._accept_loop, name=f"lkv-{transport.name}-accept {address}",
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
                    t.log.warning("%s listener %s: accept failed: %s", t.name, self.address, exc)
                    threading.Event().wait(0.1)  # e.g. out of descriptors: do not spin
                    continue
                try:
                    tune(conn, t.socket_options)
                    ch = t._channel(conn, sockaddr_str(addr), self.handler, self.memory)
                except OSError as exc:
                    t.log.warning("%s listener %s: cannot set up connection from %s: %s",
                                  t.name, self.address, addr, exc)
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
            self.thread.join(JOIN_S)


class StreamTransport(Transport):
    """Frames over sockets, one :class:`StreamChannel` per connection.

    A subclass sets ``name`` (which every message and thread name carries), ``log``, ``peer_type``
    and (in ``__init__``) ``socket_options``, and builds its channels in :meth:`_channel`;
    :meth:`_check_peer`, :meth:`_connected` and :meth:`_release` are optional hooks.
    """

    log: logging.Logger
    socket_options: SocketOptions
    peer_type: type[StreamPeer] = StreamPeer

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        if config.connections_per_peer < 1:
            msg = f"{self.name} transport: connections_per_peer must be at least 1, got {config.connections_per_peer}"
            raise ValueError(msg)
        if not (config.io_timeout_s > 0 and config.connect_timeout_s > 0):
            msg = (
                f"{self.name} transport: io_timeout_s and connect_timeout_s must be positive seconds, got "
                f"{config.io_timeout_s} and {config.connect_timeout_s}"
            )
            raise ValueError(msg)
        self._lock = threading.Lock()
        self._closed = False
        self._listeners: list[_Listener] = []
        self._channels: set[StreamChannel] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} listening={self.addresses} channels={len(self._channels)}>"

    @abc.abstractmethod
    def _channel(self, sock: socket.socket, peer_name: str, handler: FrameHandler,
                 memory: MemoryRegistry) -> StreamChannel:
        """A channel (not started) over a connected socket; it must call ``_forget`` on exit."""

    def _check_peer(self, address: str) -> None:
        """Refuse an address before connecting to it (TransferError naming the fix)."""

    def _connected(self, ch: StreamChannel) -> None:
        """A channel ``connect`` opened, before it is started (e.g. a handshake)."""

    def _release(self) -> None:
        """Free what the transport holds beyond its channels; runs once, after they are closed."""

    def _check_open(self) -> None:
        if self._closed:
            msg = f"this {self.name} transport is closed; build a new one from its provider"
            raise TransferError(msg)

    def _adopt(self, ch: StreamChannel) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._channels.add(ch)
            return True

    def _forget(self, ch: StreamChannel) -> None:
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
        sock = open_listener(host, port, self.socket_options, self.name)
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

    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> StreamPeer:
        """Open ``connections_per_peer`` channels to ``address`` (see :meth:`_connected`)."""
        self._check_open()
        self._check_peer(address)
        socks: list[socket.socket] = []
        chans: list[StreamChannel] = []
        try:
            for _ in range(self.config.connections_per_peer):
                socks.append(open_connection(address, self.config.connect_timeout_s, self.socket_options, self.name))
                chans.append(self._channel(socks[-1], address, handler, memory))
                self._connected(chans[-1])
        except BaseException:
            for s in socks:
                s.close()
            raise
        with self._lock:
            adopted = not self._closed
            if adopted:
                self._channels.update(chans)
        if not adopted:
            for s in socks:
                s.close()
            self._check_open()
        for ch in chans:
            ch.start()
        return self.peer_type(address, chans)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners, self._listeners = self._listeners, []
            channels = list(self._channels)
        for lst in listeners:
            lst.stop()
        for ch in channels:
            ch.close()
        self._release()
