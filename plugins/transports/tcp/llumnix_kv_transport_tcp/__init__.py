"""TCP transport of llumnix-kv: frames over plain TCP sockets, payload moved by the native core.

The implementation lives in :mod:`llumnix_kv_transport_tcp.transport`; it is imported only
when the transport is built (see :mod:`llumnix_kv_transport_tcp.plugin`).
"""

__all__: list[str] = []
