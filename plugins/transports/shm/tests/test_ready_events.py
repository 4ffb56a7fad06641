"""Layer-wise readiness: the event given to ``layer_ready`` reaches the transport with that layer's frames."""

from __future__ import annotations

import time

from llumnix_kv_transport_shm.channel import ShmChannel
from test_agent_shm import _cache

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.wire import new_transfer_id


def test_each_layer_frame_carries_its_layers_event(monkeypatch):
    seen: list[tuple[int, int | None]] = []
    original = ShmChannel.send_data

    def recording(self, transfer_id, layer, *arrays, ready_event=None, epoch=0):
        seen.append((layer, ready_event))
        return original(self, transfer_id, layer, *arrays, epoch=epoch)  # host memory here: nothing to wait for

    monkeypatch.setattr(ShmChannel, "send_data", recording)
    _p_pool, p_layout = _cache(3)  # the pools stay referenced: the agents read and write them
    _d_pool, d_layout = _cache(4)
    sig = {"model": "toy", "groups": [dict(p_layout.signature)]}
    cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0)
    shm = build_registry().transport("shm")
    p = KVAgent(shm.factory(cfg), [p_layout], sig, timeout_s=10.0)
    d = KVAgent(shm.factory(cfg), [d_layout], sig, timeout_s=10.0)
    try:
        addr = p.listen("127.0.0.1", 0)
        tid = new_transfer_id()
        p.sender.open(tid, {0: [1, 2, 3]})
        d.receiver.start(tid, addr, {0: [4, 5, 6]}, {0: 0})
        names = [t.name for t in p_layout.tensors]
        events = {name: 1000 + i for i, name in enumerate(names)}  # stand-in handles
        for name in names:
            p.sender.layer_ready(tid, name, 0, 3, ready_event=events[name])
        p.sender.complete(tid, {0: 3})
        deadline = time.monotonic() + 20
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done, failed = d.receiver.poll()
            assert not failed
            time.sleep(0.01)
        assert done == {tid}
    finally:
        d.close()
        p.close()
    regions = {t.name: i for i, t in enumerate(sorted(p_layout.tensors, key=lambda t: t.name))}
    assert sorted(seen) == sorted((regions[n], events[n]) for n in names)
