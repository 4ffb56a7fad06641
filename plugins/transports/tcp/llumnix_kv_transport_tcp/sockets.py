"""Options of the TCP transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.streams.sockets import SocketOptions
from llumnix_kv_core.streams.sockets import options_from_extra


@dataclass(frozen=True)
class TcpOptions(SocketOptions):
    """Transport-specific options, read from ``TransportConfig.extra``.

    :param socket_buffer_bytes: SO_SNDBUF / SO_RCVBUF asked for on every socket
        (the kernel caps it at ``net.core.[rw]mem_max``); 0 leaves the kernel's autotuning.
    :param listen_backlog: backlog of listening sockets.
    """

    @classmethod
    def from_extra(cls, extra: tuple[tuple[str, Any], ...]) -> TcpOptions:
        given = options_from_extra("tcp", extra, {"socket_buffer_bytes", "listen_backlog"})
        return cls(**{k: int(v) for k, v in given.items()})
