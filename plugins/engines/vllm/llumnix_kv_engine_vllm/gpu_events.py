"""CUDA events that tell the transfer threads when a layer's KV is written (GPU caches).

``save_kv_layer`` only records an event on the current stream: no host synchronisation on the
forward thread, and a recording inside a CUDA-graph capture becomes a graph node. The transport
makes its copy stream wait for the event, so layer i moves while layer i+1 computes. Events are
reused across steps: a wait on a later recording of the same event is only later, never wrong.
"""

from __future__ import annotations

from llumnix_kv_core import native


class LayerEvents:
    """One event per layer (recorded by the layer hook) and one per step (for layers without hooks)."""

    def __init__(self, layers: list[str], device: int) -> None:
        self._cuda = native.cuda()
        self._cuda.set_device(device)
        self._events = {name: self._cuda.event_create() for name in layers}
        self._step = self._cuda.event_create()
        self._recorded: set[str] = set()

    @staticmethod
    def _stream() -> int:
        import torch

        return torch.cuda.current_stream().cuda_stream

    def record_layer(self, layer: str) -> int | None:
        """Record ``layer``'s event after the writes queued so far; None for an unknown layer."""
        event = self._events.get(layer)
        if event is not None:
            self._cuda.event_record(event, self._stream())
            self._recorded.add(layer)
        return event

    def end_step(self) -> tuple[int, list[str]]:
        """Record the step event; returns it with the layers whose hook did not record this step."""
        self._cuda.event_record(self._step, self._stream())
        missing = [name for name in self._events if name not in self._recorded]
        self._recorded.clear()
        return self._step, missing

    def close(self) -> None:
        for event in (*self._events.values(), self._step):
            self._cuda.event_destroy(event)
        self._events = {}
