"""The in-process loopback transport of the core's tests: the conformance suite, and holding frames back."""

from __future__ import annotations

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import registered
from llumnix_kv_core.testing.loopback import LoopbackTransport
from llumnix_kv_core.testing.transport import TransportConformance
from llumnix_kv_core.wire import Kind


class TestLoopbackConformance(TransportConformance):
    transport_name = "loopback"
    transport_factory = LoopbackTransport
    supports_processes = False  # addresses live in one process
    raw_socket_frames = False  # no sockets at all
    address_pattern = r"loop://[1-9][0-9]*"

    def dead_address(self) -> str:
        return "loop://999999999"


def test_paused_delivery_holds_frames_in_order_until_resumed():
    srv, cli = LoopbackTransport(_config()), LoopbackTransport(_config())
    try:
        smem = MemoryRegistry()
        buf = registered(smem, 1, 4096)
        shand = Recorder()
        peer = cli.connect(srv.listen("", 0, shand, smem), Recorder(), MemoryRegistry())
        srv.pause_delivery()
        src = np.full(1000, 7, np.uint8)
        tids = [wire.new_transfer_id() for _ in range(3)]
        for i, tid in enumerate(tids):
            peer.channels[0].send_data(tid, i, np.array([src.ctypes.data], np.uint64), np.ones(1, np.uint64),
                                       np.array([i * 1000], np.uint64), np.array([1000], np.uint64))
        peer.channels[0].send_control(Kind.DONE, tids[-1])
        assert srv.queued_bytes == 3000  # they left the sender, nothing reached the handler
        assert not shand.asked
        assert not buf.any()
        srv.resume_delivery()
        shand.wait(lambda r: len(r.controls) == 1)
        assert [t for _, t, _, _, _ in shand.data] == [bytes.fromhex(t) for t in tids]
        assert (buf[:3000] == 7).all()
        assert srv.queued_bytes == 0
    finally:
        cli.close()
        srv.close()


def test_options_and_addresses_are_checked():
    with pytest.raises(ValueError, match=r"unknown loopback transport option.*window_bytes"):
        LoopbackTransport(_config(extra=(("ring", 1),)))
    with pytest.raises(ValueError, match="connections_per_peer"):
        LoopbackTransport(_config(connections_per_peer=0))
    t = LoopbackTransport(_config())
    try:
        with pytest.raises(TransferError, match=r"bad loopback address '127.0.0.1:5'.*loop://<number>"):
            t.connect("127.0.0.1:5", Recorder(), MemoryRegistry())
        addr = t.listen("", 0, Recorder(), MemoryRegistry())
        with pytest.raises(TransferError, match="another listener has it"):
            LoopbackTransport(_config()).listen("", int(addr.removeprefix("loop://")), Recorder(), MemoryRegistry())
    finally:
        t.close()


def _config(**kw) -> TransportConfig:
    return TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, **kw)
