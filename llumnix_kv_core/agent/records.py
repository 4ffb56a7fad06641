"""One line per finished transfer, for engines' metrics: what moved, how long it took, how it ended."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class TransferRecord:
    """A transfer that reached a final state on this side.

    ``direction`` is ``load`` (this side received) or ``send``; ``outcome`` the final state's
    value (load: done, failed, cancelled; send: acked, failed, cancelled, expired);
    ``seconds`` runs from the pull's start (load) or the first receiver's pull (send; 0 when
    nobody pulled) to the final state.
    """

    direction: str
    transfer_id: str
    outcome: str
    nbytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome in ("done", "acked")


class RecordLog:
    """Records waiting to be taken, bounded so that a process nobody reads from does not grow."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self._records: deque[TransferRecord] = deque(maxlen=keep)

    def add(self, record: TransferRecord) -> None:
        with self._lock:
            self._records.append(record)

    def take(self) -> list[TransferRecord]:
        """Every record added since the last call, oldest first."""
        with self._lock:
            out = list(self._records)
            self._records.clear()
            return out


class BusyTime:
    """Length of the union of [start, end) intervals added in order of their end.

    Merged intervals are kept at the tail (a new interval can only overlap those); at most
    ``keep`` of them stay, older ones only count in the total.
    """

    def __init__(self, keep: int = 1024) -> None:
        self._lock = threading.Lock()
        self._spans: deque[list[float]] = deque()
        self._closed = 0.0  # length of spans dropped from the head
        self._keep = keep
        self.count = 0

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self.count += 1
            start = min(start, end)
            while self._spans and self._spans[-1][1] >= start:
                a, b = self._spans.pop()
                start, end = min(a, start), max(b, end)
            self._spans.append([start, end])
            while len(self._spans) > self._keep:
                a, b = self._spans.popleft()
                self._closed += b - a

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._closed + sum(b - a for a, b in self._spans)
