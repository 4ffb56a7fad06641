"""The shm transport: a loopback listener, peers of several channels, the CUDA IPC mappings they share."""

from __future__ import annotations

import logging
import socket
import threading

from llumnix_kv_transport_tcp.sockets import TcpOptions
from llumnix_kv_transport_tcp.sockets import format_address
from llumnix_kv_transport_tcp.sockets import open_connection
from llumnix_kv_transport_tcp.sockets import open_listener
from llumnix_kv_transport_tcp.sockets import sockaddr_str
from llumnix_kv_transport_tcp.sockets import tune

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_transport_shm.channel import ShmChannel
from llumnix_kv_transport_shm.ipc import IpcMappings
from llumnix_kv_transport_shm.local import ShmOptions
from llumnix_kv_transport_shm.local import check_local

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.5
_JOIN_S = 10.0
_SOCKETS = TcpOptions(socket_buffer_bytes=1 << 20)  # control messages only: small buffers suffice


class ShmPeer(Peer):
    def __init__(self, address: str, channels: list[ShmChannel]) -> None:
        self.address = address
        self._channels: list[Channel] = list(channels)

    @property
    def channels(self) -> list[Channel]:
        return list(self._channels)

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __repr__(self) -> str:
        return f"<ShmPeer {self.address} channels={len(self._channels)}>"


class _Listener:
    def __init__(self, transport: ShmTransport, sock: socket.socket, address: str, handler: FrameHandler,
                 memory: MemoryRegistry) -> None:
        self.transport = transport
        self.sock = sock
        self.address = address
        self.handler = handler
        self.memory = memory
        self.stopping = False
        sock.settimeout(_ACCEPT_POLL_S)
        self.thread = threading.Thread(target=self._accept_loop, name=f"lkv-shm-accept {address}", daemon=True)

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
                    log.warning("shm listener %s: accept failed: %s", self.address, exc)
                    threading.Event().wait(0.1)
                    continue
                try:
                    tune(conn, _SOCKETS)
                    ch = ShmChannel(conn, sockaddr_str(addr), self.handler, self.memory, t, on_exit=t._forget)
                except OSError as exc:
                    log.warning("shm listener %s: cannot set up connection from %s: %s", self.address, addr, exc)
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


class ShmTransport(Transport):
    """Processes of one host. Options in ``config.extra``: see :class:`~llumnix_kv_transport_shm.local.ShmOptions`."""

    name = "shm"

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        if config.connections_per_peer < 1:
            msg = f"connections_per_peer must be at least 1, got {config.connections_per_peer}"
            raise ValueError(msg)
        if not (config.io_timeout_s > 0 and config.connect_timeout_s > 0):
            msg = (f"io_timeout_s and connect_timeout_s must be positive seconds, got {config.io_timeout_s} "
                   f"and {config.connect_timeout_s}")
            raise ValueError(msg)
        self.options = ShmOptions.from_extra(config.extra)
        self.mappings = IpcMappings()
        self._lock = threading.Lock()
        self._closed = False
        self._listeners: list[_Listener] = []
        self._channels: set[ShmChannel] = set()

    def __repr__(self) -> str:
        return f"<ShmTransport listening={self.addresses} channels={len(self._channels)}>"

    def _check_open(self) -> None:
        if self._closed:
            msg = "this shm transport is closed; build a new one from its provider"
            raise TransferError(msg)

    def _adopt(self, ch: ShmChannel) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._channels.add(ch)
            return True

    def _forget(self, ch: ShmChannel) -> None:
        with self._lock:
            self._channels.discard(ch)

    @property
    def addresses(self) -> list[str]:
        return [x.address for x in self._listeners]

    def listen(self, host: str, port: int, handler: FrameHandler, memory: MemoryRegistry) -> str:
        """Listen on ``host:port`` of this host (port 0: ephemeral); returns ``host:port``.

        Only processes of this host can use the address; a loopback host (127.0.0.1) keeps it so.
        """
        self._check_open()
        sock = open_listener(host, port, _SOCKETS)
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

    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> ShmPeer:
        """Open ``connections_per_peer`` channels to an shm listener of this host and do the handshake."""
        self._check_open()
        check_local(address)
        chans: list[ShmChannel] = []
        try:
            for _ in range(self.config.connections_per_peer):
                s = open_connection(address, self.config.connect_timeout_s, _SOCKETS)
                ch = ShmChannel(s, address, handler, memory, self, on_exit=self._forget)
                chans.append(ch)
                ch.handshake(self.config.connect_timeout_s)
        except BaseException:
            for ch in chans:
                ch._sock.close()
            raise
        with self._lock:
            adopted = not self._closed
            if adopted:
                self._channels.update(chans)
        if not adopted:
            for ch in chans:
                ch._sock.close()
            self._check_open()
        for ch in chans:
            ch.start()
        return ShmPeer(address, chans)

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
        self.mappings.close()
