"""Conformance: addresses, control frames, and DATA frames landing byte-exact in registered memory."""

from __future__ import annotations

import contextlib
import re
import threading

import numpy as np
import pytest

from llumnix_kv_core import wire
from llumnix_kv_core.errors import FrameError
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder
from llumnix_kv_core.testing.frames import expected_copy
from llumnix_kv_core.testing.frames import scatter_plan
from llumnix_kv_core.testing.transport.base import ConformanceBase
from llumnix_kv_core.testing.transport.base import one_segment
from llumnix_kv_core.wire import Kind

REGION_BYTES = 8 << 20


class DataTests(ConformanceBase):
    def test_listen_returns_the_bound_address(self, make_transport):
        t = make_transport()
        addr = t.listen("127.0.0.1", 0, Recorder(), MemoryRegistry())
        assert re.fullmatch(self.address_pattern, addr), addr
        assert t.addresses == [addr]

    def test_connect_opens_connections_per_peer(self, make_transport):
        p = self.connect_pair(make_transport)
        assert len(p.peer.channels) == 3
        assert all(c.peer_name == p.peer.address for c in p.peer.channels)
        accepted = {p.server_channel(k) for k in range(3)}
        assert len(accepted) == 3  # one accepted channel per connection

    def test_control_round_trip(self, make_transport):
        p = self.connect_pair(make_transport)
        tid = wire.new_transfer_id()
        body = {"model": "m", "layers": list(range(5)), "nested": {"a": 1.5, "b": None}}
        p.peer.channels[1].send_control(Kind.HELLO, tid, body)
        p.shand.wait(lambda r: len(r.controls) == 1)
        ch, kind, t, got = p.shand.controls[0]
        assert (kind, t, got) == (Kind.HELLO, bytes.fromhex(tid), body)
        ch.send_control(Kind.HELLO_OK, bytes.fromhex(tid))  # reply on the accepted channel
        p.chand.wait(lambda r: len(r.controls) == 1)
        assert p.chand.controls[0] == (p.peer.channels[1], Kind.HELLO_OK, bytes.fromhex(tid), {})

    @pytest.mark.parametrize(("n", "block"), [(1, 1024), (4096, 1024), (100, 70_000)])
    def test_scattered_data_both_directions(self, make_transport, n, block):
        """Unaligned lengths, shuffled destinations, both directions (1 MiB and more: several chunks)."""
        p = self.connect_pair(make_transport, server_regions={5: REGION_BYTES}, client_regions={2: REGION_BYTES})
        rng = np.random.default_rng(n)
        size = n * block
        # client -> server: region 5 of the server
        src_c = rng.integers(0, 256, size, dtype=np.uint8)
        s_off, d_off, lengths = scatter_plan(rng, n, block)
        tid = wire.new_transfer_id()
        sent = p.peer.channels[0].send_data(tid, 9, np.uint64(src_c.ctypes.data) + s_off, np.full(n, 5, np.uint64),
                                            d_off, lengths)
        assert sent == int(lengths.sum())
        p.shand.wait(lambda r: len(r.data) == 1)
        ch, t, layer, nbytes, nseg = p.shand.data[0]
        assert (t, layer, nbytes, nseg) == (bytes.fromhex(tid), 9, sent, n)
        np.testing.assert_array_equal(p.sbufs[5][:size], expected_copy(src_c, size, s_off, d_off, lengths))
        assert not p.sbufs[5][size:].any()

        # server -> client on the accepted channel: region 2 of the client
        src_s = rng.integers(0, 256, size, dtype=np.uint8)
        s_off, d_off, lengths = scatter_plan(rng, n, block)
        ch.send_data(bytes.fromhex(tid), 10, np.uint64(src_s.ctypes.data) + s_off, np.full(n, 2, np.uint64),
                     d_off, lengths)
        p.chand.wait(lambda r: len(r.data) == 1)
        assert p.chand.data[0][0] is p.peer.channels[0]
        assert p.chand.data[0][2:] == (10, int(lengths.sum()), n)
        np.testing.assert_array_equal(p.cbufs[2][:size], expected_copy(src_s, size, s_off, d_off, lengths))
        assert not p.cbufs[2][size:].any()

    def test_many_regions_in_one_frame(self, make_transport):
        p = self.connect_pair(make_transport, server_regions=dict.fromkeys((1, 4, 7), 64 << 10))
        src = np.arange(3 * 1000, dtype=np.uint8)
        regions = np.array([1, 4, 7] * 1000, dtype=np.uint64)
        offsets = np.repeat(np.arange(1000, dtype=np.uint64) * 64, 3)
        addrs = np.uint64(src.ctypes.data) + np.arange(3000, dtype=np.uint64)
        p.peer.channels[0].send_data(wire.new_transfer_id(), 0, addrs, regions, offsets, np.ones(3000, np.uint64))
        p.shand.wait(lambda r: len(r.data) == 1)
        for k, rid in enumerate((1, 4, 7)):
            np.testing.assert_array_equal(p.sbufs[rid][::64][:1000], src[k::3])

    def test_empty_data_frame(self, make_transport):
        p = self.connect_pair(make_transport)
        e = np.zeros(0, np.uint64)
        assert p.peer.channels[0].send_data(wire.new_transfer_id(), 3, e, e, e, e) == 0
        p.shand.wait(lambda r: len(r.data) == 1)
        assert p.shand.data[0][2:] == (3, 0, 0)

    def test_concurrent_senders(self, make_transport):
        """Eight threads share three channels; each writes its own region; frames never interleave."""
        n_threads, frames, n, block = 8, 6, 512, 256
        p = self.connect_pair(make_transport, server_regions={10 + i: frames * n * block for i in range(n_threads)})
        srcs = [np.random.default_rng(i).integers(0, 256, frames * n * block, dtype=np.uint8) for i in range(n_threads)]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for f in range(frames):
                    off = np.arange(n, dtype=np.uint64) * np.uint64(block) + np.uint64(f * n * block)
                    p.peer.channel_for(i + f).send_data(
                        wire.new_transfer_id(), f, np.uint64(srcs[i].ctypes.data) + off[::-1].copy(),
                        np.full(n, 10 + i, np.uint64), off, np.full(n, block, np.uint64))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not errors
        p.shand.wait(lambda r: len(r.data) == n_threads * frames)
        for i in range(n_threads):
            want = srcs[i].reshape(frames, n, block)[:, ::-1, :].reshape(-1)
            np.testing.assert_array_equal(p.sbufs[10 + i], want)
        assert not p.shand.closed

    def test_refused_data_is_drained_unwritten_and_the_stream_stays_in_sync(self, make_transport):
        refused = wire.new_transfer_id()
        p = self.connect_pair(make_transport, connections=1, server_regions={1: 8 << 20}, fill=0xAB,
                              shand=Recorder(refuse={bytes.fromhex(refused)}))
        rng = np.random.default_rng(0)
        src = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
        s_off, d_off, lengths = scatter_plan(rng, 2048, 4096)
        ch = p.peer.channels[0]
        regions = np.ones(2048, np.uint64)
        ch.send_data(refused, 1, np.uint64(src.ctypes.data) + s_off, regions, d_off, lengths)  # > buffers, rings
        ch.send_control(Kind.DONE, refused, {"n": 1})
        ok = wire.new_transfer_id()
        ch.send_data(ok, 2, np.uint64(src.ctypes.data) + s_off[:10], regions[:10], d_off[:10], lengths[:10])
        p.shand.wait(lambda r: len(r.data) == 1)
        assert p.shand.asked == [(bytes.fromhex(refused), 1, 0), (bytes.fromhex(ok), 2, 0)]
        assert p.shand.data[0][1] == bytes.fromhex(ok)  # on_data only for the accepted frame
        assert [(k, b) for _, k, _, b in p.shand.controls] == [(Kind.DONE, {"n": 1})]
        base = np.full(8 << 20, 0xAB, np.uint8)
        want = expected_copy(src, 8 << 20, s_off[:10], d_off[:10], lengths[:10], base=base)
        np.testing.assert_array_equal(p.sbufs[1], want)
        assert not p.shand.closed

    def test_handler_exception_does_not_kill_the_channel(self, make_transport):
        def boom(*_):
            raise RuntimeError("handler bug")

        p = self.connect_pair(make_transport, connections=1, shand=Recorder(on_control_cb=boom))
        for _ in range(3):
            p.peer.channels[0].send_control(Kind.PULL, wire.new_transfer_id(), {})
        p.shand.wait(lambda r: len(r.controls) == 3)
        assert not p.shand.closed

    def test_handler_accept_exception_drops_the_payload(self, make_transport):
        bad = b"\x0b" * 16

        def accept(tid: bytes, _layer: int, _epoch: int) -> bool:
            if tid == bad:
                raise RuntimeError("handler bug")
            return True

        p = self.connect_pair(make_transport, connections=1, server_regions={1: 4096},
                              shand=Recorder(accept_cb=accept))
        src = np.full(4096, 3, np.uint8)
        p.peer.channels[0].send_data(bad, 0, *one_segment(src, 1))
        assert not p.sbufs[1].any()
        p.peer.channels[0].send_data(b"\x0c" * 16, 0, *one_segment(src, 1))
        p.shand.wait(lambda r: len(r.data) == 1)
        assert p.shand.data[0][1] == b"\x0c" * 16
        assert (p.sbufs[1] == 3).all()
        assert not p.shand.closed

    def test_bad_send_arguments_leave_the_channel_usable(self, make_transport):
        p = self.connect_pair(make_transport)
        ch = p.peer.channels[0]
        one = np.ones(1, np.uint64)
        with pytest.raises(ValueError, match="one length"):
            ch.send_data(wire.new_transfer_id(), 0, one, one, np.zeros(2, np.uint64), one)
        with pytest.raises(ValueError, match="integers"):
            ch.send_data(wire.new_transfer_id(), 0, one, one, np.zeros(1, np.float64), one)
        with pytest.raises(ValueError, match="layer"):
            ch.send_data(wire.new_transfer_id(), -1, one, one, one, one)
        with pytest.raises(ValueError, match="send_data"):
            ch.send_control(Kind.DATA, wire.new_transfer_id())
        ch.send_control(Kind.CANCEL, wire.new_transfer_id(), {"why": "test"})
        p.shand.wait(lambda r: len(r.controls) == 1)
        assert not ch.closed

    def test_overrunning_frame_is_refused_and_nothing_is_written(self, make_transport):
        """Segments are checked against the receiver's regions before a byte is written."""
        p = self.connect_pair(make_transport, connections=1, server_regions={1: 4096})
        src = np.full(8192, 5, np.uint8)
        ch = p.peer.channels[0]
        if self.sender_checks_regions:
            with pytest.raises(ValueError, match="overruns region 1"):
                ch.send_data(wire.new_transfer_id(), 0, *one_segment(src, 1))
            assert not ch.closed
        else:
            # The send may return before the receiver has checked the table.
            with contextlib.suppress(TransferError):
                ch.send_data(wire.new_transfer_id(), 0, *one_segment(src, 1))
            p.chand.wait(lambda r: len(r.closed) == 1)
            p.chand.wait(lambda r: any(k == Kind.ERROR for _, k, _, _ in r.controls))
            err = next(b for _, k, _, b in p.chand.controls if k == Kind.ERROR)["error"]
            assert "overruns region 1" in err
            assert self.refusal_hint in err
            p.shand.wait(lambda r: len(r.closed) == 1)
            assert isinstance(p.shand.closed[0][1], FrameError)
            assert "overruns region 1" in str(p.shand.closed[0][1])
        assert not p.sbufs[1].any()
        assert not p.shand.data
