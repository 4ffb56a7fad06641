"""A HELLO's body, checked where it arrives: who the receiver is and how its cache is laid out.

Body: ``{"agent": id, "channel": index, "tp": [rank, size], "signature": {...}, "layers": [...]}``.
A body that is not so is refused with an ERROR naming the field; the handshake fails cleanly on
the receiver's side instead of a handler exception on ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.errors import FrameError

MAX_CHANNELS = 64  # connections one receiver may open to one sender
MAX_TP = 1024


@dataclass(frozen=True)
class Hello:
    agent_id: str
    channel: int
    rank: int
    size: int
    signature: dict[str, Any]
    layers: list[Any]


def _bounded_int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value < hi:
        msg = f"HELLO {what} is {value!r}, not an integer in [{lo}, {hi})"
        raise FrameError(msg)
    return value


def parse_hello(body: dict[str, Any]) -> Hello:
    """The checked HELLO; FrameError naming the first malformed field."""
    agent = body.get("agent")
    if not isinstance(agent, str) or not 0 < len(agent) <= 64:
        msg = f"HELLO agent is {agent!r}, not a non-empty id of at most 64 characters"
        raise FrameError(msg)
    channel = _bounded_int(body.get("channel", 0), "channel", 0, MAX_CHANNELS)
    tp = body.get("tp", [0, 1])
    if not isinstance(tp, list | tuple) or len(tp) != 2:
        msg = f"HELLO tp is {tp!r}, not [rank, size]"
        raise FrameError(msg)
    size = _bounded_int(tp[1], "tp size", 1, MAX_TP + 1)
    rank = _bounded_int(tp[0], "tp rank", 0, size)
    signature, layers = body.get("signature", {}), body.get("layers", [])
    if not isinstance(signature, dict):
        msg = f"HELLO signature is a {type(signature).__name__}, not an object"
        raise FrameError(msg)
    if not isinstance(layers, list):
        msg = f"HELLO layers is a {type(layers).__name__}, not a list"
        raise FrameError(msg)
    return Hello(agent, channel, rank, size, signature, layers)
