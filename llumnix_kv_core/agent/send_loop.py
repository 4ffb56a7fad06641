"""The sender's I/O threads: one per channel of a receiver, running the jobs queued for it in order.

A job sends one frame (DATA or a control frame) and records the outcome itself; the planner,
the engine-facing calls and the frame callbacks only queue jobs, so none of them waits for I/O.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]


class SendLoop:
    """A queue of jobs and the thread that runs them, one after the other, until :meth:`stop`."""

    def __init__(self, name: str = "llumnix-kv-send") -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """The thread ends after the jobs queued so far."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()
