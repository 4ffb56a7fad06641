"""States of a transfer on either side, and the only moves between them.

Sending side (prefill)::

    OPEN --> ACKED       every receiver confirmed it
         --> FAILED      a send failed, a receiver left, a preemption, or no confirmation in time
         --> CANCELLED   a receiver cancelled it, or the engine aborted the request
         --> EXPIRED     nobody pulled it before its lease ended

Receiving side (decode)::

    CONNECTING --> PULLING      the first source accepted the pull (PULLING: more sources may follow)
    CONNECTING, PULLING --> FAILED, CANCELLED
    PULLING --> DONE            every source's DONE totals arrived, with as many frames and bytes

Every other state is final: nothing leaves it. :func:`move` is how a state changes.
"""

from __future__ import annotations

import enum
from typing import TypeVar


class SendState(enum.Enum):
    """A transfer on the sending side."""

    OPEN = "open"
    ACKED = "acked"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class RecvState(enum.Enum):
    """A transfer on the receiving side."""

    CONNECTING = "connecting"
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_S = SendState
_R = RecvState
TRANSITIONS: dict[enum.Enum, frozenset[enum.Enum]] = {
    _S.OPEN: frozenset({_S.ACKED, _S.FAILED, _S.CANCELLED, _S.EXPIRED}),
    _S.ACKED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.EXPIRED: frozenset(),
    _R.CONNECTING: frozenset({_R.PULLING, _R.FAILED, _R.CANCELLED}),
    _R.PULLING: frozenset({_R.DONE, _R.FAILED, _R.CANCELLED}),
    _R.DONE: frozenset(),
    _R.FAILED: frozenset(),
    _R.CANCELLED: frozenset(),
}

State = TypeVar("State", SendState, RecvState)


class InvalidTransition(RuntimeError):
    """A state change :data:`TRANSITIONS` does not allow: a bug in the agent, never a peer's doing."""


def is_final(state: SendState | RecvState) -> bool:
    return not TRANSITIONS[state]


def move(current: State, new: State) -> State:
    """``new``, if :data:`TRANSITIONS` allows ``current`` -> ``new``; InvalidTransition otherwise."""
    if new not in TRANSITIONS[current]:
        msg = f"transfer state {current.name} cannot become {new.name}"
        raise InvalidTransition(msg)
    return new
