"""The TCP transport: listeners with an accept thread, peers of several connections.

Every connection is a :class:`~llumnix_kv_transport_tcp.channel.TcpChannel` with its
own receive thread. Channels are bidirectional: the listening side answers on the
channel it accepted, so DATA may flow either way on any channel.
"""

from __future__ import annotations

import logging
import socket

from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.streams.transport import StreamPeer
from llumnix_kv_core.streams.transport import StreamTransport
from llumnix_kv_transport_tcp.channel import TcpChannel
from llumnix_kv_transport_tcp.sockets import TcpOptions


class TcpPeer(StreamPeer):
    """The channels one ``connect`` opened to ``address`` (closed channels stay in place)."""


class TcpTransport(StreamTransport):
    """Frames over TCP sockets. Options in ``config.extra``: see :class:`TcpOptions`."""

    name = "tcp"
    log = logging.getLogger(__name__)
    peer_type = TcpPeer

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self.options = self.socket_options = TcpOptions.from_extra(config.extra)

    def _channel(self, sock: socket.socket, peer_name: str, handler: FrameHandler,
                 memory: MemoryRegistry) -> TcpChannel:
        return TcpChannel(sock, peer_name, handler, memory, self.config.io_timeout_s, on_exit=self._forget,
                          digest=self.config.digest)
