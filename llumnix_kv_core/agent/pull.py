"""A PULL's body, checked where it arrives: which destination blocks a receiver wants written.

Body: ``{"blocks": {"<group>": [block id, ...]}, "start": {"<group>": first position}, "epoch": n}``.
Every group must be one of the receiver's cache groups, every block id inside each of that group's
pools (as the receiver announced them at handshake), every start within its block list. ``epoch``
(an integer in [0, 2**64), 0 when absent) names the receiver's allocation of those blocks: the
sender stamps it on every DATA frame and on the DONE of this pull (see :mod:`llumnix_kv_core.wire`).
A body that is not so is refused with an ERROR naming the cause; nothing of it reaches the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.agent.layers import LayerEntry
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.wire import MAX_EPOCH


@dataclass(frozen=True)
class Pull:
    """Where one receiver wants a transfer written: its block ids and first position, per cache group."""

    dst_blocks: dict[int, list[int]]
    dst_start: dict[int, int]
    epoch: int = 0


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        msg = f"{what} is {value!r}, not an integer"
        raise FrameError(msg)
    return value


def _group(key: Any, pools: dict[int, int]) -> int:
    try:
        g = int(key)
    except (TypeError, ValueError) as exc:
        msg = f"cache group {key!r} is not an integer"
        raise FrameError(msg) from exc
    if g not in pools:
        msg = f"cache group {g} is not one of the receiver's groups {sorted(pools)}"
        raise FrameError(msg)
    return g


def _object(body: dict[str, Any], key: str, required: bool) -> dict[Any, Any]:
    value = body.get(key) if key in body or required else {}
    if not isinstance(value, dict):
        msg = f"'{key}' is {'missing' if value is None else type(value).__name__}, not an object of cache groups"
        raise FrameError(msg)
    return value


def parse_pull(body: dict[str, Any], layers: dict[str, LayerEntry]) -> Pull:
    """The checked :class:`Pull` of ``body`` for a receiver with ``layers``; FrameError naming what is wrong."""
    pools: dict[int, int] = {}  # group -> blocks of its smallest pool on the receiver
    for e in layers.values():
        pools[e.group_id] = min(pools.get(e.group_id, e.tensor.num_blocks), e.tensor.num_blocks)
    blocks: dict[int, list[int]] = {}
    for key, ids in _object(body, "blocks", True).items():
        g = _group(key, pools)
        if not isinstance(ids, list):
            msg = f"blocks of group {g} are {type(ids).__name__}, not a list of block ids"
            raise FrameError(msg)
        for b in ids:
            if not 0 <= _int(b, f"a block id of group {g}") < pools[g]:
                msg = f"block id {b} of group {g} is outside the receiver's pool of {pools[g]} blocks"
                raise FrameError(msg)
        blocks[g] = list(ids)
    start: dict[int, int] = {}
    for key, s in _object(body, "start", False).items():
        g = _group(key, pools)
        if not 0 <= _int(s, f"the start of group {g}") <= len(blocks.get(g, ())):
            msg = f"start {s} of group {g} is outside its {len(blocks.get(g, ()))} block ids"
            raise FrameError(msg)
        start[g] = s
    epoch = _int(body.get("epoch", 0), "the epoch")
    if not 0 <= epoch <= MAX_EPOCH:
        msg = f"epoch {epoch} is outside [0, 2**64)"
        raise FrameError(msg)
    return Pull(blocks, start, epoch)
