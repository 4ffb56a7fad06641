"""Conformance: closing channels, peers and transports; failed connects; timeouts; what errors say."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.transport.base import ConformanceBase
from llumnix_kv_core.testing.transport.base import one_segment
from llumnix_kv_core.wire import Kind


class LifecycleTests(ConformanceBase):
    def test_send_on_closed_channel_raises(self, make_transport):
        p = self.connect_pair(make_transport)
        ch = p.peer.channels[0]
        ch.close()
        assert ch.closed
        with pytest.raises(TransferError, match="closed"):
            ch.send_control(Kind.HELLO, wire.new_transfer_id())
        e = np.zeros(0, np.uint64)
        with pytest.raises(TransferError, match="closed"):
            ch.send_data(wire.new_transfer_id(), 0, e, e, e, e)
        p.chand.wait(lambda r: len(r.closed) == 1)
        assert p.chand.closed[0] == (ch, None)  # a local close is clean
        p.shand.wait(lambda r: len(r.closed) == 1)  # the other side sees the peer go
        assert isinstance(p.shand.closed[0][1], TransferError)
        p.peer.channels[1].send_control(Kind.HELLO, wire.new_transfer_id())  # the others still work
        p.shand.wait(lambda r: len(r.controls) == 1)

    def test_peer_close_reaches_both_sides(self, make_transport):
        p = self.connect_pair(make_transport)
        p.peer.close()
        p.peer.close()
        p.chand.wait(lambda r: len(r.closed) == 3)
        assert all(e is None for _, e in p.chand.closed)
        p.shand.wait(lambda r: len(r.closed) == 3)
        assert all("closed the connection" in str(e) for _, e in p.shand.closed)

    def test_transport_close_is_idempotent_and_stops_everything(self, make_transport):
        p = self.connect_pair(make_transport, connections=2)
        for ch in p.peer.channels:  # both connections accepted before closing
            ch.send_control(Kind.HELLO, wire.new_transfer_id())
        p.shand.wait(lambda r: len(r.controls) == 2)
        p.server.close()
        p.server.close()
        p.shand.wait(lambda r: len(r.closed) == 2)
        assert all(e is None for _, e in p.shand.closed)
        p.chand.wait(lambda r: len(r.closed) == 2)  # the peer's channels see the other side go
        assert all(isinstance(e, TransferError) for _, e in p.chand.closed)
        with pytest.raises(TransferError):
            p.client.connect(p.address, p.chand, MemoryRegistry())  # nobody listens any more
        with pytest.raises(TransferError, match="closed"):
            p.server.listen("127.0.0.1", 0, p.shand, MemoryRegistry())
        p.client.close()
        assert not self.threads_left()

    def test_connect_to_nothing_fails_quickly_naming_the_address(self, make_transport):
        address = self.dead_address()
        t = make_transport()
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            t.connect(address, Recorder(), MemoryRegistry())
        assert time.monotonic() - t0 < 5
        assert address in str(info.value)
        self.assert_names_transport(info.value)

    def test_send_times_out_when_the_receiver_does_not_take_the_data(self, make_transport):
        """The receiver's handler holds the first frame: buffers, rings or windows fill, the send fails
        after io_timeout_s, and the channel is closed."""
        gate = threading.Event()
        p = self.connect_pair(make_transport, connections=1, server_regions={1: 16 << 20},
                              shand=Recorder(accept_cb=lambda _tid, _layer, _epoch: gate.wait(30.0)),
                              client_config={"io_timeout_s": 0.5})
        ch = p.peer.channels[0]
        src = np.zeros(16 << 20, np.uint8)

        def send_until_it_fails() -> None:
            for i in range(64):  # 1 GiB at most: far more than any buffer holds
                ch.send_data(wire.new_transfer_id(), i, *one_segment(src, 1))

        try:
            with pytest.raises(TransferTimeoutError) as info:
                send_until_it_fails()
            self.assert_names_transport(info.value)
            assert ch.closed
            p.chand.wait(lambda r: len(r.closed) == 1)
            assert isinstance(p.chand.closed[0][1], TransferTimeoutError)
        finally:
            gate.set()

    def test_errors_name_the_transport(self, make_transport):
        """Messages of failures say which transport failed (several transports share code)."""
        p = self.connect_pair(make_transport)
        ch = p.peer.channels[0]
        one = np.ones(1, np.uint64)
        with pytest.raises(ValueError, match="one length") as bad:
            ch.send_data(wire.new_transfer_id(), 0, one, one, np.zeros(2, np.uint64), one)
        self.assert_names_transport(bad.value)
        ch.close()
        with pytest.raises(TransferError) as closed:
            ch.send_control(Kind.HELLO, wire.new_transfer_id())
        self.assert_names_transport(closed.value)
        p.shand.wait(lambda r: len(r.closed) == 1)
        self.assert_names_transport(p.shand.closed[0][1])
        with pytest.raises(TransferError) as refused:
            p.client.connect(self.dead_address(), Recorder(), MemoryRegistry())
        self.assert_names_transport(refused.value)
