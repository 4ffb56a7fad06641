"""The shm transport: a loopback listener, peers of several channels, the legacy CUDA IPC mappings they share."""

from __future__ import annotations

import logging
import socket
import threading

from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.streams.channel import StreamChannel
from llumnix_kv_core.streams.sockets import SocketOptions
from llumnix_kv_core.streams.transport import StreamPeer
from llumnix_kv_core.streams.transport import StreamTransport
from llumnix_kv_transport_shm.channel import ShmChannel
from llumnix_kv_transport_shm.ipc import IpcMappings
from llumnix_kv_transport_shm.local import ShmOptions
from llumnix_kv_transport_shm.local import check_local

_SOCKETS = SocketOptions(socket_buffer_bytes=1 << 20)  # control messages only: small buffers suffice


class ShmPeer(StreamPeer):
    """The channels one ``connect`` opened to an shm listener of this host."""


class ShmTransport(StreamTransport):
    """Processes of one host. Options in ``config.extra``: see :class:`~llumnix_kv_transport_shm.local.ShmOptions`.

    Only processes of this host can use a listening address; a loopback host (127.0.0.1) keeps it
    so. ``connect`` refuses peers on other hosts and does the shm handshake on every channel.
    """

    name = "shm"
    log = logging.getLogger(__name__)
    peer_type = ShmPeer
    socket_options = _SOCKETS

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self.options = ShmOptions.from_extra(config.extra)
        self.mappings = IpcMappings()
        self._opening = threading.local()  # the channels the running ``connect`` of this thread opened

    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> StreamPeer:
        """As the stream transport's; when it fails, its channels (never started) release their GPU mappings."""
        opened: list[ShmChannel] = []
        self._opening.channels = opened
        try:
            return super().connect(address, handler, memory)
        except BaseException:
            for ch in opened:
                ch.release_gpu_mappings()
            raise
        finally:
            del self._opening.channels

    def _channel(self, sock: socket.socket, peer_name: str, handler: FrameHandler,
                 memory: MemoryRegistry) -> ShmChannel:
        return ShmChannel(sock, peer_name, handler, memory, self.options, self.mappings, self.config.io_timeout_s,
                          on_exit=self._forget)

    def _check_peer(self, address: str) -> None:
        check_local(address)

    def _connected(self, ch: StreamChannel) -> None:
        assert isinstance(ch, ShmChannel)
        self._opening.channels.append(ch)
        ch.handshake(self.config.connect_timeout_s)

    def _release(self) -> None:
        self.mappings.close()
