"""The transfer agent: one per engine worker, engine-neutral, on top of any transport.

It owns the transport, the registered memory (one region per cache tensor), a
sender (prefill side) and a receiver (decode side), and routes incoming frames.
Engine adapters call it; it never calls back into an engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.agent.receiver import KVReceiver
from llumnix_kv_core.agent.records import TransferRecord
from llumnix_kv_core.agent.sender import KVSender
from llumnix_kv_core.errors import DigestMismatchError
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import Peer
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind

log = logging.getLogger(__name__)

__all__ = ["AgentStats", "KVAgent", "TransferRecord"]


@dataclass(frozen=True)
class AgentStats:
    bytes_sent: int
    bytes_received: int
    transfers_received: int
    receive_seconds: float  # time during which at least one transfer had data flowing in


class KVAgent(FrameHandler):
    def __init__(
        self,
        transport: Transport,
        layouts: list[KVLayout],
        signature: dict[str, Any],
        *,
        timeout_s: float = 60.0,
        device: str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.transport = transport
        self.layers = LayerTable(layouts)
        self.memory = MemoryRegistry()
        self.layers.register(self.memory, device)
        self.signature = signature
        self.sender = KVSender(self.layers, signature, timeout_s, tp_rank, tp_size)
        self.receiver = KVReceiver(self.layers, signature, timeout_s, self._connect, tp_rank, tp_size)
        self.address: str | None = None

    def listen(self, host: str, port: int) -> str:
        self.address = self.transport.listen(host, port, self, self.memory)
        return self.address

    def _connect(self, address: str) -> Peer:
        return self.transport.connect(address, self, self.memory)

    def stats(self) -> AgentStats:
        busy = self.receiver.busy
        return AgentStats(self.sender.bytes_sent, self.receiver.bytes_received, busy.count, busy.seconds)

    def take_records(self) -> list[TransferRecord]:
        """Transfers that ended on either side since the last call (see :class:`TransferRecord`)."""
        return self.receiver.records.take() + self.sender.records.take()

    def close(self) -> None:
        self.receiver.stop()
        self.sender.stop()
        self.transport.close()

    # -- FrameHandler ----------------------------------------------------------------------------
    def accept_data(self, transfer_id: bytes, layer: int, epoch: int) -> bool:
        return self.receiver.accept_data(transfer_id.hex(), epoch)

    def on_data(self, channel: Channel, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        self.receiver.on_data(transfer_id.hex(), nbytes)

    def on_data_failed(self, channel: Channel, transfer_id: bytes, layer: int, error: Exception) -> None:
        where = ""
        if isinstance(error, DigestMismatchError):
            where = f" [{self.layers.locate(error.region, error.offset)}]"
        why = f"data from the prefill instance at {channel.peer_name} failed its check: {error}{where}"
        self.receiver.on_data_failed(transfer_id.hex(), why)

    def on_control(self, channel: Channel, kind: Kind, transfer_id: bytes, body: dict[str, Any]) -> None:
        tid = transfer_id.hex()
        if kind == Kind.HELLO:
            self.sender.on_hello(channel, body)
        elif kind == Kind.HELLO_OK:
            self.receiver.on_hello_ok(channel)
        elif kind == Kind.PULL:
            self.sender.on_pull(channel, tid, body)
        elif kind == Kind.DONE:
            self.receiver.on_done(tid, body, channel)
        elif kind == Kind.ACK:
            self.sender.on_ack(tid, channel)
        elif kind == Kind.CANCEL:
            self.sender.on_cancel(tid, channel)
        elif kind == Kind.ERROR:
            self.receiver.on_error(channel, None if transfer_id == bytes(16) else tid, body)

    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        if error is not None:
            log.info("channel %s closed: %s", channel.peer_name, error)
        self.sender.on_closed(channel)
        self.receiver.on_closed(channel, error)
