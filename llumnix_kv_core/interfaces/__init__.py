"""Interfaces that plugins implement. Objects behind them are resolved once, then called directly."""

from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig

__all__ = ["Channel", "FrameHandler", "LayoutParser", "Peer", "Transport", "TransportConfig"]
