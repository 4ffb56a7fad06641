"""Transfer records and the busy-time union the agent's stats are built from."""

from __future__ import annotations

import random

import pytest

from llumnix_kv_core.agent.records import BusyTime
from llumnix_kv_core.agent.records import RecordLog
from llumnix_kv_core.agent.records import TransferRecord


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@pytest.mark.parametrize("seed", range(20))
def test_busy_time_is_the_union_of_intervals_added_by_end(seed):
    rng = random.Random(seed)
    ends = sorted(rng.uniform(0, 100) for _ in range(200))
    intervals = [(e - rng.uniform(0, 10), e) for e in ends]
    busy = BusyTime()
    for a, b in intervals:
        busy.add(a, b)
    assert busy.seconds == pytest.approx(union_length(intervals))
    assert busy.count == 200


def test_busy_time_keeps_a_bounded_tail_and_the_total():
    busy = BusyTime(keep=4)
    for i in range(100):
        busy.add(2 * i, 2 * i + 1)  # disjoint: 100 spans of 1 s
    assert busy.seconds == pytest.approx(100.0)
    assert len(busy._spans) == 4


def test_record_log_hands_each_record_out_once_and_stays_bounded():
    log = RecordLog(keep=3)
    for i in range(5):
        log.add(TransferRecord("load", f"t{i}", "done", i, 0.1))
    assert [r.transfer_id for r in log.take()] == ["t2", "t3", "t4"]
    assert log.take() == []
    assert not TransferRecord("send", "t", "expired", 0, 0.0).ok
