"""A prefill agent on real tcp against a peer speaking raw frames: bad PULLs are refused with an ERROR and
planning goes on, refusals never stall the engine's calls, repeated HELLOs do not leak send threads, and the
decode side acknowledges transfers without a thread per transfer."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core import wire
from llumnix_kv_core.agent.layers import LayerTable
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import expected_after
from llumnix_kv_core.testing.agents import send_all
from llumnix_kv_core.testing.agents import wait_for
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.testing.frames import raw_frame
from llumnix_kv_core.testing.frames import read_frame
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()
D_BLOCKS = 48  # blocks of the decode cache of the pair fixture (conftest.py)



def control(kind: Kind, tid: bytes, body: dict) -> bytes:
    return raw_frame(kind, tid=tid, body=wire.encode_body(body))


def good_hello(d: KVCache) -> dict:
    """The HELLO a decode agent with cache ``d`` sends on channel index 0."""
    return {"agent": "raw-receiver", "signature": d.signature(), "layers": LayerTable([d.layout]).describe(),
            "tp": [0, 1], "channel": 0}


def raw_receiver(address: str, d: KVCache, hellos: int = 1) -> socket.socket:
    """A raw connection to P that sent D's HELLO ``hellos`` times on channel index 0 and read each HELLO_OK."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    for _ in range(hellos):
        s.sendall(control(Kind.HELLO, bytes(16), good_hello(d)))
        h, _ = read_frame(s, timeout=5.0)
        assert h.kind == Kind.HELLO_OK
    return s


def check_still_serves(p, pa, d, da) -> None:
    tid, pb, db = new_transfer_id(), [1, 2], [3, 4]
    expected = expected_after(p, pb, d, db)
    send_all(pa, tid, p, pb)
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)


@pytest.mark.parametrize(("body", "cause"), [
    ({"blocks": {"0": [1, 10**30]}}, "outside the receiver's pool"),
    ({"blocks": {"0": [-1]}}, "outside the receiver's pool"),
    ({"blocks": {"0": [D_BLOCKS]}}, "outside the receiver's pool"),
    ({"blocks": {"0": [1.5]}}, "not an integer"),
    ({"blocks": {"7": [1]}}, "not one of the receiver's groups"),
    ({"blocks": {"0": 3}}, "not a list of block ids"),
    ({"blocks": {"0": [1]}, "start": {"0": 2}}, "start 2 of group 0"),
    ({"start": {"0": 0}}, "'blocks' is missing"),
])
@pytest.mark.parametrize("opened", [True, False], ids=["open", "parked"])
def test_bad_pull_is_refused_and_planning_goes_on(pair, body, cause, opened):
    p, pa, d, da = pair
    tid = new_transfer_id()
    if opened:
        send_all(pa, tid, p, [0, 1])
    with raw_receiver(pa.address, d) as s:
        s.sendall(control(Kind.PULL, bytes.fromhex(tid), body))
        reply = read_frame(s, timeout=5.0)
        assert reply is not None, "the bad PULL was not refused"
        assert reply[0].kind == Kind.ERROR
        assert reply[0].transfer_id.hex() == tid
        assert cause in reply[1]["error"]
        assert "PULL" in reply[1]["error"]
        if not opened:
            send_all(pa, tid, p, [0, 1])  # the engine's open() must not trip over the refused PULL
    check_still_serves(p, pa, d, da)


def test_pull_before_hello_flood_does_not_stall_layer_ready(pair):
    """P answers each such PULL with an ERROR into a socket nobody reads: the engine's calls must not wait."""
    p, pa, _, _ = pair
    tid = new_transfer_id()
    pa.sender.open(tid, {0: [0, 1]})
    host, port = pa.address.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    pull = control(Kind.PULL, b"\x01" * 16, {"blocks": {"0": [0]}})
    stop = threading.Event()

    def flood() -> None:
        try:
            while not stop.is_set():
                s.sendall(pull * 256)
        except OSError:
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    worst = 0.0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            pa.sender.layer_ready(tid, p.names[0], 0, 1)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.001)
    finally:
        stop.set()
        s.shutdown(socket.SHUT_RDWR)  # wakes the flooder's blocked send
        flooder.join(5.0)
        s.close()
    assert worst < 0.1, f"layer_ready waited {worst * 1000:.0f} ms while P refused PULLs"


def test_repeated_hello_on_one_channel_index_keeps_one_send_thread(pair):
    p, pa, d, da = pair

    def send_threads() -> int:
        return sum(th.name == "llumnix-kv-send" for th in threading.enumerate())

    before = send_threads()
    with raw_receiver(pa.address, d, hellos=20):
        wait_for(lambda: send_threads() <= before + 1, "the replaced send threads to end", timeout=5.0)
    check_still_serves(p, pa, d, da)


def test_decode_acks_without_a_thread_per_transfer(pair, monkeypatch):
    """D confirms each transfer with an ACK; once the connections stand, that starts no thread."""
    p, pa, d, da = pair
    check_still_serves(p, pa, d, da)  # connects and shakes hands
    started: list[str] = []
    start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(10):
        check_still_serves(p, pa, d, da)
    assert started == [], f"threads started for 10 transfers: {started}"


@pytest.mark.parametrize(("change", "cause"), [
    ({"agent": None}, "HELLO agent is None"),
    ({"agent": "x" * 65}, "at most 64 characters"),
    ({"tp": "0,1"}, "HELLO tp is '0,1'"),
    ({"tp": [0, 0]}, "tp size is 0"),
    ({"tp": [3, 2]}, "tp rank is 3"),
    ({"channel": 10**6}, "channel is 1000000"),
    ({"signature": []}, "signature is a list"),
    ({"layers": {}}, "layers is a dict"),
    ({"layers": [{"name": "x"}]}, "HELLO layers are malformed"),
    ({"layers": ["x"]}, "HELLO layers are malformed"),
])
def test_malformed_hello_is_refused_naming_the_field(pair, change, cause):
    p, pa, d, da = pair
    host, port = pa.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(control(Kind.HELLO, bytes(16), {**good_hello(d), **change}))
        h, body = read_frame(s, timeout=5.0)
        assert h.kind == Kind.ERROR
        assert cause in body["error"]
    check_still_serves(p, pa, d, da)
