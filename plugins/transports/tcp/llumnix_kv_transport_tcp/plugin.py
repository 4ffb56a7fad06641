"""Plugin module of the TCP transport (entry point ``transport-tcp``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llumnix_kv_core.markers import hookimpl
from llumnix_kv_core.providers import TransportProvider

if TYPE_CHECKING:
    from llumnix_kv_core.interfaces.transport import Transport
    from llumnix_kv_core.interfaces.transport import TransportConfig


def _factory(config: TransportConfig) -> Transport:
    from llumnix_kv_transport_tcp.transport import TcpTransport

    return TcpTransport(config)


@hookimpl
def llumnix_kv_register_transports() -> list[TransportProvider]:
    return [
        TransportProvider(
            "tcp",
            _factory,
            description="frames over TCP sockets (IPv4/IPv6), several connections per peer",
            memory_kinds=("cpu",),
            remote=True,
        )
    ]
