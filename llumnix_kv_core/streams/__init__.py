"""Building blocks of socket-based transports: framed channels, listeners, address parsing.

A transport plugin subclasses :class:`~llumnix_kv_core.streams.channel.StreamChannel` and
:class:`~llumnix_kv_core.streams.transport.StreamTransport`, overriding the hooks that say how
a DATA frame's payload travels; framing, the receive loop, error handling, the accept thread
and peers of several channels are shared.
"""
