"""Transport contract: move control frames and bulk segments between two processes.

A transport knows nothing of requests, layers or blocks beyond what the frame
header carries. The transfer agent (``llumnix_kv_core.agent``) drives it.

Threading: ``send_*`` may be called from any thread; a channel serialises whole
frames so frames never interleave. Handler callbacks run on the transport's own
receive threads and must not block for long.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind


@dataclass(frozen=True)
class TransportConfig:
    """Knobs every transport honours.

    :param connect_timeout_s: give up connecting after this long.
    :param io_timeout_s: a send or receive that makes no progress this long fails the channel.
    :param connections_per_peer: parallel connections opened by ``connect``.
    :param digest: a transport that carries digests (``wire.F_DIGEST``) sends one with every DATA
        segment and fails, on receipt, a frame without them; frames that carry them are always checked.
    :param extra: transport-specific options from the user's configuration.
    """

    connect_timeout_s: float = 10.0
    io_timeout_s: float = 30.0
    connections_per_peer: int = 2
    digest: bool = True
    extra: tuple[tuple[str, Any], ...] = ()


class FrameHandler(abc.ABC):
    """What the side that owns a listener or a peer does with incoming frames."""

    @abc.abstractmethod
    def accept_data(self, transfer_id: bytes, layer: int, epoch: int) -> bool:
        """Whether a DATA frame (of allocation ``epoch``) may be written into registered memory.

        Called on the receive thread before the payload is read. False makes the
        transport read the payload into scratch and drop it (a fenced transfer).
        """

    @abc.abstractmethod
    def on_data(self, channel: Channel, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        """A DATA frame's payload is fully written into registered memory (and passed its digests)."""

    @abc.abstractmethod
    def on_data_failed(self, channel: Channel, transfer_id: bytes, layer: int, error: Exception) -> None:
        """A DATA frame's payload was written but must not be used (e.g. a digest mismatch): ``error`` says why.

        Called instead of ``on_data``, after the frame was accepted; the transfer cannot succeed.
        """

    @abc.abstractmethod
    def on_control(self, channel: Channel, kind: Kind, transfer_id: bytes, body: dict[str, Any]) -> None:
        """A control frame (any kind but DATA and the transport's own TRANSPORT) arrived."""

    @abc.abstractmethod
    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        """The channel is closed; ``error`` says why when it was not a clean close."""


class Channel(abc.ABC):
    """One bidirectional connection."""

    peer_name: str

    @abc.abstractmethod
    def send_control(self, kind: Kind, transfer_id: str | bytes, body: dict[str, Any] | None = None) -> None:
        """Send one control frame (not DATA, not TRANSPORT); raises TransferError when the peer is gone."""

    @abc.abstractmethod
    def send_data(
        self,
        transfer_id: str | bytes,
        layer: int,
        src_addrs: np.ndarray,
        dst_regions: np.ndarray,
        dst_offsets: np.ndarray,
        lengths: np.ndarray,
        ready_event: int | None = None,
        epoch: int = 0,
    ) -> int:
        """Send local segments ``src_addrs[i]`` (``lengths[i]`` bytes) to be written at
        ``dst_offsets[i]`` of the peer's registered region ``dst_regions[i]``.

        ``epoch`` is the receiver's allocation epoch of the transfer (see :mod:`llumnix_kv_core.wire`),
        carried by the frame to the peer's ``accept_data``.

        Blocks until the bytes are handed to the link; returns bytes sent. No Python
        loop per segment. ``ready_event`` (a CUDA event handle, GPU sources) must complete
        before the sources are read: a GPU path waits for it on its own stream, a host path
        synchronises it first. The agent passes it only when one was given.
        """

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class Peer(abc.ABC):
    """The set of channels one side opened to a remote address."""

    address: str

    @property
    @abc.abstractmethod
    def channels(self) -> list[Channel]: ...

    def channel_for(self, key: int) -> Channel:
        """A stable channel choice for ``key`` (frames with equal keys stay in order)."""
        chans = self.channels
        return chans[key % len(chans)]

    @abc.abstractmethod
    def close(self) -> None: ...


class Transport(abc.ABC):
    """A way to move frames: TCP, shared memory, RDMA, ..."""

    name: str

    def __init__(self, config: TransportConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def listen(self, host: str, port: int, handler: FrameHandler, memory: MemoryRegistry) -> str:
        """Accept connections; returns the address peers pass to ``connect``.

        DATA frames arriving on accepted channels are written into ``memory``.
        """

    @abc.abstractmethod
    def connect(self, address: str, handler: FrameHandler, memory: MemoryRegistry) -> Peer:
        """Open ``config.connections_per_peer`` channels to ``address``.

        DATA frames arriving on these channels are written into ``memory``.
        Raises TransferTimeoutError / TransferError naming the address on failure.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening and close every channel; idempotent."""
