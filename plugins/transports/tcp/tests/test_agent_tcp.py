"""Transfer agents over real tcp: a pull on 127.0.0.1, frames held on the wire while D cancels, an
unreachable sender, a sender in another process (and killed mid-transfer).

The core tests run the agents over the in-process loopback; these are the parts that need
real sockets and processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import runpy
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.testing.agents import DEADLINE_S
from llumnix_kv_core.testing.agents import KVCache
from llumnix_kv_core.testing.agents import check_cancel_fences_memory
from llumnix_kv_core.testing.agents import check_prefill_then_decode
from llumnix_kv_core.testing.agents import expected_after
from llumnix_kv_core.testing.agents import wait_for
from llumnix_kv_core.testing.agents import wait_transfer
from llumnix_kv_core.wire import new_transfer_id

PARSER = FlashAttnParser()



@pytest.mark.parametrize("connections", [1, 2, 4])
def test_prefill_then_decode(make_agent, connections):
    check_prefill_then_decode(make_agent, PARSER, connections)


class HoldingProxy:
    """A TCP forwarder placed between D and P whose P -> D direction can be held.

    While held, whatever P sends is read off P's sockets and kept here: it has left P and
    not yet reached D, as if it were still on the wire. ``release`` delivers it in order.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.holding = False
        self.held_bytes = 0
        self.closed = False
        self.conns: list[tuple[socket.socket, socket.socket, threading.Lock, list[bytes]]] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            conn = (down, up, threading.Lock(), [])
            self.conns.append(conn)
            for args in ((down, up, None), (up, down, conn)):
                th = threading.Thread(target=self._pump, args=args, daemon=True)
                th.start()
                self.threads.append(th)

    def _pump(self, src: socket.socket, dst: socket.socket, conn) -> None:
        try:
            while data := src.recv(1 << 16):
                if conn is None:
                    dst.sendall(data)
                    continue
                with conn[2]:
                    if self.holding:
                        conn[3].append(data)
                        self.held_bytes += len(data)
                    else:
                        dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def holds(self, payload_bytes: int) -> bool:
        return self.held_bytes > payload_bytes  # payload and frame headers

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        for _down, _up, lock, buf in self.conns:
            with lock:
                for chunk in buf:
                    _down.sendall(chunk)
                buf.clear()
        self.holding = False

    def close(self) -> None:
        self.closed = True
        for down, up, _, _ in self.conns:
            for s in (down, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for th in self.threads:
            th.join(5)
        for down, up, _, _ in self.conns:
            down.close()
            up.close()
        self.listener.close()


@pytest.mark.parametrize("stale_frames_arrive", ["before_report", "after_report"])
def test_cancel_fences_memory_and_releases_sender(pair, stale_frames_arrive):
    p, pa, d, da = pair
    proxy = HoldingProxy(pa.address)
    try:
        check_cancel_fences_memory(p, pa, d, da, proxy, stale_frames_arrive)
    finally:
        proxy.close()


def test_unreachable_sender(make_agent):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
    d = KVCache(2, PARSER)
    da = make_agent([d.layout], d.signature())
    tid = new_transfer_id()
    da.receiver.start(tid, address, {0: [0]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert address in why


# -- multi-process ---------------------------------------------------------------------------------

SENDER_SCRIPT = '''
import time

from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.testing.agents import KVCache

cache = KVCache(SEED, FlashAttnParser(), **GEOMETRY)  # the test's P cache: same seed, same contents
cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, connections_per_peer=2)
agent = KVAgent(build_registry().transport("tcp").factory(cfg), [cache.layout], cache.signature(), timeout_s=10.0)
out.put(("address", agent.listen("127.0.0.1", 0)))
agent.sender.open(TID, {0: PB})
if MODE == "partial":
    agent.sender.layer_ready(TID, cache.names[0], 0, len(PB))
    out.put(("partial", None))
    time.sleep(120)  # killed by the test
else:
    for n in cache.names:
        agent.sender.layer_ready(TID, n, 0, len(PB))
    agent.sender.complete(TID, {0: len(PB)})
    agent.sender.seal(TID, True, 30.0)
    deadline = time.monotonic() + 20
    while TID not in agent.sender.poll_released() and time.monotonic() < deadline:
        time.sleep(0.01)
    out.put(("released", agent.stats().bytes_sent))
    agent.close()
'''
@pytest.fixture
def spawn_sender(tmp_path: Path):
    """Start a P process (spawn) running SENDER_SCRIPT; yields (process, queue) makers."""
    script = tmp_path / "sender_proc.py"
    script.write_text(textwrap.dedent(SENDER_SCRIPT))
    ctx = multiprocessing.get_context("spawn")
    procs = []

    def start(**globs: Any):
        out = ctx.Queue()
        proc = ctx.Process(target=runpy.run_path, args=(str(script),),
                           kwargs={"init_globals": {**globs, "out": out}, "run_name": "lkv_sender"}, daemon=True)
        proc.start()
        procs.append(proc)
        return proc, out

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def expect(out, tag: str, timeout: float = DEADLINE_S):
    try:
        got, value = out.get(timeout=timeout)
    except queue.Empty:
        msg = f"the sender process sent no {tag!r} within {timeout} s"
        raise AssertionError(msg) from None
    assert got == tag
    return value


GEOMETRY = {"blocks": 32}


def test_sender_in_another_process(make_agent, spawn_sender):
    p, d = KVCache(7, PARSER, **GEOMETRY), KVCache(8, PARSER, blocks=48)
    da = make_agent([d.layout], d.signature())
    tid = new_transfer_id()
    pb, db = [31, 30, 2, 3, 4, 5], [0, 1, 2, 47, 46, 45]
    expected = expected_after(p, pb, d, db)
    proc, out = spawn_sender(SEED=7, GEOMETRY=GEOMETRY, TID=tid, PB=pb, MODE="full")
    address = expect(out, "address")
    da.receiver.start(tid, address, {0: db}, {0: 0})
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    assert expect(out, "released") == len(pb) * len(p.names) * p.page_bytes
    proc.join(DEADLINE_S)
    assert proc.exitcode == 0


def test_sender_killed_mid_transfer(make_agent, spawn_sender):
    p, d = KVCache(7, PARSER, **GEOMETRY), KVCache(8, PARSER, blocks=48)
    da = make_agent([d.layout], d.signature(), timeout_s=60.0)
    tid = new_transfer_id()
    pb, db = [0, 1, 2, 3], [10, 11, 12, 13]
    proc, out = spawn_sender(SEED=7, GEOMETRY=GEOMETRY, TID=tid, PB=pb, MODE="partial")
    address = expect(out, "address")
    da.receiver.start(tid, address, {0: db}, {0: 0})
    expect(out, "partial")
    wait_for(lambda: np.array_equal(d.view(0)[db], p.view(0)[pb]), "layer 0 from the sender process")
    proc.kill()
    t0 = time.monotonic()
    state, why = wait_transfer(da, tid, timeout=15.0)
    assert state == "failed"
    assert address in why
    assert "closed" in why
    assert time.monotonic() - t0 < 15.0  # long before D's 60 s transfer timeout
    proc.join(10)


