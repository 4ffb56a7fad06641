"""A frame handler for transport benchmarks: counts data frames, keeps control frames, can acknowledge."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from llumnix_kv_core.bench import WAIT_S
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.wire import Kind


class FrameCounter(FrameHandler):
    """Accepts every frame; with ``reply``, answers each data frame with an ACK control frame.

    ``channel`` is the channel of the last control frame (how a listener learns its peer's channel).
    """

    def __init__(self, reply: bool = False) -> None:
        self.cond = threading.Condition()
        self.frames = 0
        self.reply = reply
        self.controls: list[tuple[Kind, dict[str, Any]]] = []
        self.channel: Channel | None = None
        self.failures: list[Exception] = []

    def accept_data(self, transfer_id: bytes, layer: int, epoch: int) -> bool:
        return True

    def on_data_failed(self, channel: Channel, transfer_id: bytes, layer: int, error: Exception) -> None:
        with self.cond:
            self.failures.append(error)
            self.cond.notify_all()

    def on_data(self, channel: Channel, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        if self.reply:
            channel.send_control(Kind.ACK, transfer_id, {"layer": layer})
        with self.cond:
            self.frames += 1
            self.cond.notify_all()

    def on_control(self, channel: Channel, kind: Kind, transfer_id: bytes, body: dict[str, Any]) -> None:
        with self.cond:
            self.channel = channel
            self.controls.append((kind, body))
            self.cond.notify_all()

    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], what: str) -> None:
        """Until ``pred()`` holds (checked under the lock); TimeoutError naming ``what`` after WAIT_S."""
        with self.cond:
            if not self.cond.wait_for(pred, WAIT_S):
                msg = f"benchmark peer did not {what} within {WAIT_S:.0f} s"
                raise TimeoutError(msg)
