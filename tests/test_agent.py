"""The transfer agent end to end over the real TCP transport on 127.0.0.1.

Prefill (P) and decode (D) each own a NumPy KV cache (one int8 pool, ``[B, H, N, C]`` views
per layer in vLLM's LBNHC order) described as a ``CacheGroupDescription`` and parsed by the
flash_attn parser. P sends blocks ``pb``; D receives them into different block ids ``db``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import re
import runpy
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.wire import new_transfer_id

DEADLINE_S = 20.0


class KVCache:
    """``layers`` int8 ``[B, H, N, C]`` tensors (C elements of 2 bytes) packed LBNHC in one pool."""

    def __init__(self, seed: int, *, layers: int = 4, blocks: int = 32, heads: int = 2, tokens: int = 4,
                 content: int = 8) -> None:
        self.shape = (blocks, heads, tokens, content * 2)
        cb = content * 2
        self.strides = (tokens * heads * cb, cb, heads * cb, 1)
        per_layer = blocks * tokens * heads * cb
        self.pool = np.random.default_rng(seed).integers(-128, 128, size=layers * per_layer, dtype=np.int8)
        self.names = [f"model.layers.{i}.self_attn" for i in range(layers)]
        base = self.pool.ctypes.data
        tensors = tuple(
            TensorDescription(name, base + i * per_layer, (blocks, heads, tokens, content),
                              (*self.strides[:3], 2), 2)
            for i, name in enumerate(self.names)
        )
        self.per_layer = per_layer
        self.page_bytes = heads * tokens * cb
        self.desc = CacheGroupDescription("vllm", 0, "attention", "FLASH_ATTN", "LBNHC", tokens, "bfloat16",
                                          tensors, {"num_kv_heads": heads})
        layout = FlashAttnParser().parse(self.desc)
        assert layout is not None
        self.layout = layout

    def view(self, layer: int, pool: np.ndarray | None = None) -> np.ndarray:
        pool = self.pool if pool is None else pool
        return as_strided(pool[layer * self.per_layer:], shape=self.shape, strides=self.strides)

    def signature(self, **override: Any) -> dict[str, Any]:
        return {"protocol": 1, "model": "toy-model", "dtype": "bfloat16", "groups": [dict(self.layout.signature)],
                **override}


def expected_after(p: KVCache, pb: list[int], d: KVCache, db: list[int], layers=None,
                   base: np.ndarray | None = None) -> np.ndarray:
    """D's pool (or ``base``) as it must be once ``pb`` of P landed in ``db`` (``layers``: default all)."""
    out = (d.pool if base is None else base).copy()
    for i in range(len(d.names)) if layers is None else layers:
        d.view(i, out)[db] = p.view(i)[pb]
    return out


def wait_for(pred: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout} s waiting for {what}"
            raise AssertionError(msg)
        time.sleep(0.005)


def wait_transfers(agent, *tids: str, timeout: float = DEADLINE_S) -> dict[str, tuple[str, str]]:
    """Poll D's receiver until every one of ``tids`` is reported: tid -> ("done", "") or ("failed", why)."""
    seen: dict[str, tuple[str, str]] = {}

    def poll():
        done, failed = agent.receiver.poll()
        assert not (done | set(failed)) - set(tids), (done, failed)
        assert not (done | set(failed)) & set(seen), f"reported twice: {done, failed}"
        seen.update({t: ("done", "") for t in done})
        seen.update({t: ("failed", why) for t, why in failed.items()})
        return len(seen) == len(tids)

    wait_for(poll, f"transfers {tids} to be reported", timeout)
    return seen


def wait_transfer(agent, tid: str, timeout: float = DEADLINE_S) -> tuple[str, str]:
    return wait_transfers(agent, tid, timeout=timeout)[tid]


def wait_released(agent, *tids: str, timeout: float = DEADLINE_S) -> None:
    """Poll P's sender until every one of ``tids`` was released (each is reported once)."""
    released: set[str] = set()

    def poll():
        released.update(agent.sender.poll_released())
        return released >= set(tids)

    wait_for(poll, f"the sender to release {tids}", timeout)


def send_all(p_agent, tid: str, cache: KVCache, pb: list[int], lease_s: float = 30.0) -> None:
    p_agent.sender.open(tid, {0: pb})
    for name in cache.names:
        p_agent.sender.layer_ready(tid, name, 0, len(pb))
    p_agent.sender.complete(tid, {0: len(pb)})
    p_agent.sender.seal(tid, True, lease_s)


@pytest.fixture
def pair(make_agent):
    """(P cache, P agent listening, D cache, D agent) with equal layouts and different contents."""
    p, d = KVCache(seed=1), KVCache(seed=2, blocks=48)
    return p, make_agent([p.layout], p.signature(), listen=True), d, make_agent([d.layout], d.signature())


# -- in-process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("connections", [1, 2, 4])
def test_prefill_then_decode(make_agent, connections):
    p, d = KVCache(seed=1), KVCache(seed=2, blocks=48)
    pa = make_agent([p.layout], p.signature(), listen=True, connections=connections)
    da = make_agent([d.layout], d.signature(), connections=connections)
    tid = new_transfer_id()
    pb, db = [3, 4, 5, 9, 17, 30], [0, 1, 40, 41, 7, 12]
    expected = expected_after(p, pb, d, db)
    send_all(pa, tid, p, pb)
    assert pa.sender.poll_released() == set()  # sealed, but nobody has it yet
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, tid)  # after D's ACK
    total = len(p.names) * len(pb) * p.page_bytes
    assert pa.stats().bytes_sent == total
    st = da.stats()
    assert (st.bytes_received, st.transfers_received) == (total, 1)
    assert st.receive_seconds > 0
    assert pa.sender.poll_released() == set()  # reported once


def test_two_transfers_share_the_connection(pair):
    p, pa, d, da = pair
    t1, t2 = new_transfer_id(), new_transfer_id()
    expected = expected_after(p, [0, 1], d, [10, 11])
    for i in range(len(d.names)):
        d.view(i, expected)[[20, 21, 22]] = p.view(i)[[2, 3, 4]]
    send_all(pa, t1, p, [0, 1])
    send_all(pa, t2, p, [2, 3, 4])
    da.receiver.start(t1, pa.address, {0: [10, 11]}, {0: 0})
    da.receiver.start(t2, pa.address, {0: [20, 21, 22]}, {0: 0})
    seen: dict[str, str] = {}

    def poll():
        done, failed = da.receiver.poll()
        assert not failed, failed
        seen.update(dict.fromkeys(done, "done"))
        return len(seen) == 2

    wait_for(poll, "both transfers")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, t1, t2)


def test_decode_first_then_layer_by_layer(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pb, db = [8, 9, 10, 11], [44, 45, 46, 47]
    expected = expected_after(p, pb, d, db)
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    # The PULL reaches P before P knows the transfer: it is parked until P opens it.
    wait_for(lambda: tid in pa.sender._pending_pulls, "the PULL to be parked on P")
    before = d.pool.copy()
    pa.sender.open(tid, {0: pb})
    time.sleep(0.2)
    np.testing.assert_array_equal(d.pool, before)  # open alone moves nothing
    for i, name in enumerate(p.names):
        # chunked prefill: the first half of the blocks, then the rest
        pa.sender.layer_ready(tid, name, 0, 2)
        want = expected_after(p, pb[:2], d, db[:2], layers=[i])
        wait_for(lambda i=i, want=want: np.array_equal(d.view(i), d.view(i, want)), f"layer {i} first chunk")
        np.testing.assert_array_equal(d.view(i)[db[2:]], d.view(i, before)[db[2:]])
        pa.sender.layer_ready(tid, name, 2, 4)
        wait_for(lambda i=i: np.array_equal(d.view(i)[db], p.view(i)[pb]), f"layer {i}")
        for later in range(i + 1, len(p.names)):  # nothing of layers not yet computed
            np.testing.assert_array_equal(d.view(later), d.view(later, before))
    assert da.receiver.poll() == (set(), {})  # all data is there, but P has not said it is complete
    pa.sender.complete(tid, {0: len(pb)})
    pa.sender.seal(tid, True, 30.0)
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, tid)


def test_start_position_skips_locally_cached_blocks(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pb, db = [1, 2, 3, 4, 5], [30, 31, 32, 33, 34]
    expected = expected_after(p, pb[2:], d, db[2:])  # D already holds the first two blocks
    send_all(pa, tid, p, pb)
    da.receiver.start(tid, pa.address, {0: db}, {0: 2})
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    assert da.stats().bytes_received == len(p.names) * 3 * p.page_bytes
    wait_released(pa, tid)


def test_incompatible_signature_names_the_fields(make_agent):
    p, d = KVCache(seed=1), KVCache(seed=2)
    pa = make_agent([p.layout], p.signature(dtype="float16", tp=2), listen=True)
    da = make_agent([d.layout], d.signature(dtype="bfloat16", tp=1))
    tid = new_transfer_id()
    before = d.pool.copy()
    send_all(pa, tid, p, [0, 1])
    da.receiver.start(tid, pa.address, {0: [0, 1]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert pa.address in why
    # every differing field, with P's value then D's
    assert re.search(r"dtype: \w+='float16' \w+='bfloat16'", why), why
    assert re.search(r"tp: \w+=2 \w+=1", why), why
    assert "model:" not in why
    np.testing.assert_array_equal(d.pool, before)
    wait_released(pa, tid, timeout=5.0)  # refused: P frees the blocks now, not after the 30 s lease


def test_different_layers_are_refused(make_agent):
    p, d = KVCache(seed=1, layers=3), KVCache(seed=2, layers=4)
    sig = p.signature()
    pa = make_agent([p.layout], sig, listen=True)
    da = make_agent([d.layout], sig)
    tid = new_transfer_id()
    send_all(pa, tid, p, [0])
    da.receiver.start(tid, pa.address, {0: [5]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert "cache layers differ" in why
    assert "model.layers.3.self_attn" in why


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
        tid, tid2 = new_transfer_id(), new_transfer_id()
        pb, db = [0, 1, 2, 3, 4, 5], [47, 46, 45, 44, 43, 42]
        pa.sender.open(tid, {0: pb})
        pa.sender.layer_ready(tid, p.names[0], 0, len(pb))
        da.receiver.start(tid, proxy.address, {0: db}, {0: 0})
        wait_for(lambda: np.array_equal(d.view(0)[db], p.view(0)[pb]), "layer 0")
        # The other layers leave P but are still "on the wire" when D cancels.
        proxy.hold()
        for name in p.names[1:]:
            pa.sender.layer_ready(tid, name, 0, len(pb))
        pa.sender.complete(tid, {0: len(pb)})
        pa.sender.seal(tid, True, 30.0)
        in_flight = (len(p.names) - 1) * len(pb) * p.page_bytes
        wait_for(lambda: proxy.held_bytes > in_flight, "P to send the remaining layers")
        da.receiver.cancel(tid)
        fenced = d.pool.copy()  # nothing is being written: P's frames are all held
        wait_released(pa, tid)  # P got the CANCEL and frees its blocks

        def deliver_stale_frames() -> None:
            # The held DATA (and DONE) frames reach D; then a second transfer on the same
            # connections: once it is in, every frame sent before it has been handled.
            proxy.release()
            send_all(pa, tid2, p, [20, 21])
            da.receiver.start(tid2, proxy.address, {0: [10, 11]}, {0: 0})

        if stale_frames_arrive == "after_report":
            assert wait_transfer(da, tid) == ("failed", "cancelled by the engine")
            deliver_stale_frames()
            assert wait_transfer(da, tid2) == ("done", "")
        else:
            deliver_stale_frames()
            # Not a single poll until every frame is handled: watch the second transfer's bytes land.
            want = expected_after(p, [20, 21], d, [10, 11], base=fenced)
            wait_for(lambda: all(np.array_equal(d.view(i)[[10, 11]], d.view(i, want)[[10, 11]])
                                 for i in range(len(d.names))), "the second transfer's data")
            assert wait_transfers(da, tid, tid2) == {tid: ("failed", "cancelled by the engine"),
                                                     tid2: ("done", "")}
        np.testing.assert_array_equal(d.pool, expected_after(p, [20, 21], d, [10, 11], base=fenced))
        assert da.receiver.poll() == (set(), {})
        wait_released(pa, tid2)
    finally:
        proxy.close()


def test_abort_on_prefill_side_fails_the_receiver(pair):
    p, pa, d, da = pair
    tid = new_transfer_id()
    pa.sender.open(tid, {0: [0, 1]})
    pa.sender.layer_ready(tid, p.names[0], 0, 2)
    da.receiver.start(tid, pa.address, {0: [0, 1]}, {0: 0})
    wait_for(lambda: np.array_equal(d.view(0)[[0, 1]], p.view(0)[[0, 1]]), "the first layer")
    pa.sender.seal(tid, False, 30.0)
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert "aborted" in why
    wait_released(pa, tid)


def test_lease_expiry_releases_unclaimed_transfer(pair):
    p, pa, _d, _da = pair
    tid = new_transfer_id()
    send_all(pa, tid, p, [0, 1, 2], lease_s=0.5)
    t0 = time.monotonic()
    assert pa.sender.poll_released() == set()
    wait_released(pa, tid, timeout=5.0)
    assert time.monotonic() - t0 >= 0.45


def test_pull_for_unknown_transfer_errors_after_timeout(make_agent):
    p, d = KVCache(seed=1), KVCache(seed=2)
    pa = make_agent([p.layout], p.signature(), listen=True, timeout_s=1.0)
    da = make_agent([d.layout], d.signature(), timeout_s=30.0)
    tid = new_transfer_id()
    t0 = time.monotonic()
    da.receiver.start(tid, pa.address, {0: [0]}, {0: 0})
    state, why = wait_transfer(da, tid, timeout=10.0)
    elapsed = time.monotonic() - t0
    assert state == "failed"
    assert f"has no transfer {tid}" in why
    assert 0.9 <= elapsed < 10.0  # P's timeout, not D's


def test_unreachable_sender(make_agent):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
    d = KVCache(seed=2)
    da = make_agent([d.layout], d.signature())
    tid = new_transfer_id()
    da.receiver.start(tid, address, {0: [0]}, {0: 0})
    state, why = wait_transfer(da, tid)
    assert state == "failed"
    assert address in why


# -- multi-process ---------------------------------------------------------------------------------

SENDER_SCRIPT = '''
import time

import numpy as np
from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription, TensorDescription
from llumnix_kv_core.manager import build_registry

# the KVCache recipe of the test module, with the same seed
layers, blocks, heads, tokens, content = GEOMETRY
cb = content * 2
per_layer = blocks * tokens * heads * cb
pool = np.random.default_rng(SEED).integers(-128, 128, size=layers * per_layer, dtype=np.int8)
names = [f"model.layers.{i}.self_attn" for i in range(layers)]
tensors = tuple(TensorDescription(n, pool.ctypes.data + i * per_layer, (blocks, heads, tokens, content),
                                  (tokens * heads * cb, cb, heads * cb, 2), 2) for i, n in enumerate(names))
desc = CacheGroupDescription("vllm", 0, "attention", "FLASH_ATTN", "LBNHC", tokens, "bfloat16", tensors,
                             {"num_kv_heads": heads})
layout = FlashAttnParser().parse(desc)
signature = {"protocol": 1, "model": "toy-model", "dtype": "bfloat16", "groups": [dict(layout.signature)]}
cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, connections_per_peer=2)
agent = KVAgent(build_registry().transport("tcp").factory(cfg), [layout], signature, timeout_s=10.0)
out.put(("address", agent.listen("127.0.0.1", 0)))
agent.sender.open(TID, {0: PB})
if MODE == "partial":
    agent.sender.layer_ready(TID, names[0], 0, len(PB))
    out.put(("partial", None))
    time.sleep(120)  # killed by the test
else:
    for n in names:
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


GEOMETRY = (4, 32, 2, 4, 8)


def test_sender_in_another_process(make_agent, spawn_sender):
    p, d = KVCache(7, blocks=32), KVCache(8, blocks=48)
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
    p, d = KVCache(7, blocks=32), KVCache(8, blocks=48)
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


def test_preemption_voids_queued_sends_and_resends_from_new_blocks(pair):
    """The engine takes a request's blocks back mid-transfer: nothing more is read from them, and
    the recomputation (in other blocks) is what the receiver ends up with."""
    p, pa, d, da = pair
    tid = new_transfer_id()
    old, new, db = [1, 2, 3, 4], [20, 21, 22, 23], [40, 41, 42, 43]
    pa.sender.open(tid, {0: old})
    da.receiver.start(tid, pa.address, {0: db}, {0: 0})
    wait_for(lambda: pa.sender._transfers[tid].attachments, "the PULL to attach")
    pa.sender.layer_ready(tid, p.names[0], 0, 2)  # part of layer 0 computed in the old blocks
    pa.sender.preempt(tid, timeout_s=5.0)
    p.pool[:] = np.roll(p.pool, 7)  # the engine reuses (overwrites) the freed blocks
    assert pa.sender._transfers[tid].reading == 0
    expected = expected_after(p, new, d, db)
    pa.sender.open(tid, {0: new})  # resumed: recomputed from scratch into new blocks
    for name in p.names:
        pa.sender.layer_ready(tid, name, 0, len(new))
    pa.sender.complete(tid, {0: len(new)})
    pa.sender.seal(tid, True, 30.0)
    assert wait_transfer(da, tid) == ("done", "")
    np.testing.assert_array_equal(d.pool, expected)
    wait_released(pa, tid)


def test_preemption_of_unknown_or_finished_transfer_is_a_no_op(pair):
    _p, pa, _d, _da = pair
    pa.sender.preempt(new_transfer_id(), timeout_s=0.1)
