"""The transport conformance suite over shm, once per host-memory path (a shared ring, cross-memory attach)."""

from __future__ import annotations

from shm_testkit import CMA
from shm_testkit import SMALL_RING
from shm_testkit import needs_cma
from shm_testkit import ring_files

from llumnix_kv_core.testing.transport import TransportConformance


class ShmConformance(TransportConformance):
    transport_name = "shm"
    refusal_hint = "Both sides must run the same llumnix-kv release"
    threads_settle_s = 5.0  # a peer's receive thread may still be running its on_closed

    def check_process_left_nothing(self, pid: int) -> None:
        assert ring_files(pid) == [], f"process {pid} left shared-memory rings behind"


class TestShmRingConformance(ShmConformance):
    """Host memory through a small shared ring (1 MiB slots, 3 of them: big frames wrap it)."""

    options = dict(SMALL_RING)


@needs_cma
class TestShmCmaConformance(ShmConformance):
    """Host memory written by the kernel straight into the receiver (cross-memory attach)."""

    options = dict(CMA)
    sender_checks_regions = True  # the sender writes the peer's memory itself: it checks every segment first
