"""An in-process transport for tests: channels are pairs of queues, no sockets, no processes.

Addresses are ``loop://<n>``, known only inside this process. A frame travels like this:

* ``send_control`` encodes the body (JSON, size-checked as on the wire) and queues it on the
  peer channel; ``send_data`` checks its arguments, gathers the source segments into a staging
  buffer (so the caller may reuse them once it returns) and queues the frame. The queued DATA
  bytes of a channel are bounded by ``window_bytes`` (an option, like a socket's buffers): a
  sender waits for room, at most ``io_timeout_s``, then fails the channel with
  TransferTimeoutError. A frame larger than the window goes alone.
* Every channel has its own delivery thread, so handler callbacks never run on the sender's
  stack. For DATA it asks ``accept_data`` (False: the frame is dropped, nothing is written),
  checks the segments against its MemoryRegistry and scatters the payload with
  ``native.copy_segments``, then calls ``on_data``. A segment outside the registered memory
  is refused as tcp refuses it: an ERROR frame saying why goes back, and the channel closes
  with a FrameError (the peer sees it close).
* ``close`` of a channel reaches the other side after the frames it sent before, as a FIN
  would; a channel that failed or was closed delivers nothing more. ``on_closed`` runs once, on
  the delivery thread.

``connect`` never waits (a listener is in this process or nowhere), so ``connect_timeout_s``
only has to be positive. Host memory only. ``pause_delivery`` / ``resume_delivery`` hold a
transport's incoming frames back, as if they were still on the wire.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.loopback_channel import NAME
from llumnix_kv_core.testing.loopback_channel import LoopbackChannel
from llumnix_kv_core.testing.loopback_channel import pair

__all__ = ["NAME", "LoopbackChannel", "LoopbackPeer", "LoopbackTransport"]

SCHEME = "loop://"
DEFAULT_WINDOW_BYTES = 64 << 20

_registry_lock = threading.Lock()
_listeners: dict[str, _Listener] = {}
_numbers = itertools.count(1)
_connections = itertools.count(1)


@dataclass(frozen=True)
class _Listener:
    transport: LoopbackTransport
    handler: FrameHandler
    memory: MemoryRegistry


class LoopbackPeer(Peer):
    """The channels one ``connect`` opened to ``address``."""

    def __init__(self, address: str, channels: list[LoopbackChannel]) -> None:
        self.address = address
        self._channels: list[Channel] = list(channels)

    @property
    def channels(self) -> list[Channel]:
        return list(self._channels)

    def close(self) -> None:
        for c in self._channels:
            c.close()


class LoopbackTransport(Transport):
    """Frames between transports of one process. Option (``config.extra``): ``window_bytes``."""

    name = NAME

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        extra = dict(config.extra)
        unknown = sorted(set(extra) - {"window_bytes"})
        if unknown:
            msg = f"unknown {NAME} transport option(s) {', '.join(unknown)}; it understands window_bytes"
            raise ValueError(msg)
        self.window_bytes = int(extra.get("window_bytes", DEFAULT_WINDOW_BYTES))
        if config.connections_per_peer < 1 or self.window_bytes < 1:
            msg = (f"{NAME} transport: connections_per_peer and window_bytes must be at least 1, got "
                   f"{config.connections_per_peer} and {self.window_bytes}")
            raise ValueError(msg)
        if not (config.io_timeout_s > 0 and config.connect_timeout_s > 0):
            msg = (f"{NAME} transport: io_timeout_s and connect_timeout_s must be positive seconds, got "
                   f"{config.io_timeout_s} and {config.connect_timeout_s}")
            raise ValueError(msg)
        self.paused = False
        self._lock = threading.Lock()
        self._closed = False
        self._addresses: list[str] = []
        self._channels: set[LoopbackChannel] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} listening={self.addresses} channels={len(self._channels)}>"

    @property
    def addresses(self) -> list[str]:
        """The addresses this transport listens on."""
        return list(self._addresses)

    def _check_open(self) -> None:
        if self._closed:
            msg = f"this {NAME} transport is closed; build a new one"
            raise TransferError(msg)

    def _adopt(self, ch: LoopbackChannel) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._channels.add(ch)
            return True

    def _forget(self, ch: LoopbackChannel) -> None:
        with self._lock:
            self._channels.discard(ch)

    def listen(self, host: str, port: int, handler: FrameHandler, memory: MemoryRegistry) -> str:
        """Listen on ``loop://<port>`` (port 0: the next free number); ``host`` is not used."""
        self._check_open()
        with _registry_lock:
            number = port
            while not number or f"{SCHEME}{number}" in _listeners:
                if port:
                    msg = f"{NAME} transport cannot listen on {SCHEME}{port}: another listener has it; use port 0"
                    raise TransferError(msg)
                number = next(_numbers)
            address = f"{SCHEME}{number}"
            _listeners[address] = _Listener(self, handler, memory)
        with self._lock:
            self._addresses.append(address)
        return address

    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> LoopbackPeer:
        """Open ``connections_per_peer`` channels to the listener at ``address``."""
        self._check_open()
        if not (isinstance(address, str) and address.startswith(SCHEME) and address[len(SCHEME):].isdigit()):
            msg = f"bad {NAME} address {address!r}: expected {SCHEME}<number>, as listen returns it"
            raise TransferError(msg)
        with _registry_lock:
            lst = _listeners.get(address)
        if lst is None:
            msg = f"{NAME} peer {address} refused the connection (nothing listens there in this process)"
            raise TransferError(msg)
        pairs = []
        for _ in range(self.config.connections_per_peer):
            mine = LoopbackChannel(self, address, handler, memory)
            theirs = LoopbackChannel(lst.transport, f"{address}#{next(_connections)}", lst.handler, lst.memory)
            pair(mine, theirs)
            pairs.append((mine, theirs))
        if not all(lst.transport._adopt(theirs) for _, theirs in pairs):
            for _, theirs in pairs:
                lst.transport._forget(theirs)
            msg = f"{NAME} peer {address} refused the connection (its transport is closed)"
            raise TransferError(msg)
        if not all(self._adopt(mine) for mine, _ in pairs):
            for mine, theirs in pairs:
                self._forget(mine)
                lst.transport._forget(theirs)
            self._check_open()
        for mine, theirs in pairs:
            theirs.start()
            mine.start()
        chans = [mine for mine, _ in pairs]
        return LoopbackPeer(address, chans)

    def pause_delivery(self) -> None:
        """Hold back every frame reaching this transport's channels (they stay queued, as on the wire)."""
        self.paused = True

    def resume_delivery(self) -> None:
        """Deliver the held frames, in order, and whatever comes next."""
        self.paused = False
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            with ch._cond:
                ch._cond.notify_all()

    @property
    def queued_bytes(self) -> int:
        """DATA bytes that reached this transport's channels and were not handled yet."""
        with self._lock:
            return sum(ch.queued_bytes for ch in self._channels)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels)
        with _registry_lock:
            for address in self._addresses:
                _listeners.pop(address, None)
        for ch in channels:
            ch.close()
