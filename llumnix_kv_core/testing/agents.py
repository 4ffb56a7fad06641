"""Helpers of transfer-agent tests: toy KV caches, agents over a given transport, waiting for outcomes.

A test makes prefill (P) and decode (D) agents with :func:`agents`, each owning a
:class:`KVCache` (one NumPy int8 pool, ``[B, H, N, C]`` views per layer in vLLM's LBNHC order)
parsed by the layout parser it is given. P sends blocks ``pb``; D receives them into different
block ids ``db``; :func:`expected_after` says what D's pool must then hold.
:func:`check_cancel_fences_memory` is a whole scenario, run over any way (a :class:`FrameHold`)
of keeping P's frames in flight.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import as_strided

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.interfaces.transport import Transport
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.wire import new_transfer_id

DEADLINE_S = 20.0


class KVCache:
    """``layers`` int8 ``[B, H, N, C]`` tensors (C elements of 2 bytes) packed LBNHC in one pool.

    ``parser`` (a layout parser of standard attention pages, e.g. flash_attn's) gives the layout.
    """

    def __init__(self, seed: int, parser: LayoutParser, *, layers: int = 4, blocks: int = 32, heads: int = 2,
                 tokens: int = 4, content: int = 8) -> None:
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
        layout = parser.parse(self.desc)
        assert layout is not None
        self.layout: KVLayout = layout

    def view(self, layer: int, pool: np.ndarray | None = None) -> np.ndarray:
        pool = self.pool if pool is None else pool
        return as_strided(pool[layer * self.per_layer:], shape=self.shape, strides=self.strides)

    def signature(self, **override: Any) -> dict[str, Any]:
        return {"protocol": 1, "model": "toy-model", "dtype": "bfloat16", "groups": [dict(self.layout.signature)],
                **override}


def expected_after(p: KVCache, pb: list[int], d: KVCache, db: list[int], layers: list[int] | None = None,
                   base: np.ndarray | None = None) -> np.ndarray:
    """D's pool (or ``base``) as it must be once ``pb`` of P landed in ``db`` (``layers``: default all)."""
    out = (d.pool if base is None else base).copy()
    for i in range(len(d.names)) if layers is None else layers:
        d.view(i, out)[db] = p.view(i)[pb]
    return out


@contextlib.contextmanager
def agents(factory: Callable[[TransportConfig], Transport], thread_prefix: str) -> Iterator[Callable[..., KVAgent]]:
    """``make(layouts, signature, timeout_s=10.0, listen=False, connections=2, tp=(rank, size), digest=True)
    -> KVAgent`` over transports built by ``factory``.

    Every agent is closed at the end, and no thread whose name starts with ``thread_prefix`` may outlive it.
    """
    made: list[KVAgent] = []

    def make(layouts: list[KVLayout], signature: dict[str, Any], *, timeout_s: float = 10.0, listen: bool = False,
             connections: int = 2, tp: tuple[int, int] = (0, 1), digest: bool = True) -> KVAgent:
        cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, connections_per_peer=connections,
                              digest=digest)
        agent = KVAgent(factory(cfg), list(layouts), dict(signature), timeout_s=timeout_s, tp_rank=tp[0],
                        tp_size=tp[1])
        made.append(agent)
        if listen:
            agent.listen("127.0.0.1", 0)
        return agent

    yield make
    for agent in made:
        agent.close()
    # A channel closed by its peer may still be finishing its on_closed callback: allow it a moment.
    for th in threading.enumerate():
        if th.name.startswith(thread_prefix):
            th.join(5.0)
    left = [th.name for th in threading.enumerate() if th.name.startswith(thread_prefix)]
    assert not left, f"transport threads still running after close: {left}"


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


def wait_transfers(agent: KVAgent, *tids: str, timeout: float = DEADLINE_S) -> dict[str, tuple[str, str]]:
    """Poll D's receiver until every one of ``tids`` is reported: tid -> ("done", "") or ("failed", why)."""
    seen: dict[str, tuple[str, str]] = {}

    def poll() -> bool:
        done, failed = agent.receiver.poll()
        assert not (done | set(failed)) - set(tids), (done, failed)
        assert not (done | set(failed)) & set(seen), f"reported twice: {done, failed}"
        seen.update({t: ("done", "") for t in done})
        seen.update({t: ("failed", why) for t, why in failed.items()})
        return len(seen) == len(tids)

    wait_for(poll, f"transfers {tids} to be reported", timeout)
    return seen


def wait_transfer(agent: KVAgent, tid: str, timeout: float = DEADLINE_S) -> tuple[str, str]:
    return wait_transfers(agent, tid, timeout=timeout)[tid]


def wait_released(agent: KVAgent, *tids: str, timeout: float = DEADLINE_S) -> None:
    """Poll P's sender until every one of ``tids`` was released (each is reported once)."""
    released: set[str] = set()

    def poll() -> bool:
        released.update(agent.sender.poll_released())
        return released >= set(tids)

    wait_for(poll, f"the sender to release {tids}", timeout)


def check_prefill_then_decode(make_agent: Callable[..., KVAgent], parser: LayoutParser, connections: int) -> None:
    """P keeps six blocks, D pulls them into other block ids over ``connections`` connections: byte-exact,
    P released once after D's ACK, both sides' byte counts equal."""
    p, d = KVCache(1, parser), KVCache(2, parser, blocks=48)
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


def send_all(p_agent: KVAgent, tid: str, cache: KVCache, pb: list[int], lease_s: float = 30.0) -> None:
    """P opens ``tid`` on blocks ``pb``, every layer is ready, complete and sealed."""
    p_agent.sender.open(tid, {0: pb})
    for name in cache.names:
        p_agent.sender.layer_ready(tid, name, 0, len(pb))
    p_agent.sender.complete(tid, {0: len(pb)})
    p_agent.sender.seal(tid, True, lease_s)


class FrameHold(Protocol):
    """Holds back what P sends to D, as if it were still on the wire."""

    address: str  # what D connects to, to reach P through the hold

    def hold(self) -> None: ...

    def release(self) -> None:
        """Deliver what was held, in order, and stop holding."""

    def holds(self, payload_bytes: int) -> bool:
        """Whether frames carrying ``payload_bytes`` of DATA (and more) are held."""


def check_cancel_fences_memory(p: KVCache, pa: KVAgent, d: KVCache, da: KVAgent, hold: FrameHold,
                               stale_frames_arrive: str) -> None:
    """D cancels while P's last layers are in flight: none of them may land, P frees its blocks, and the
    connection still serves the next transfer. ``stale_frames_arrive``: ``"before_report"`` or
    ``"after_report"`` (of the cancelled transfer by D's receiver)."""
    tid, tid2 = new_transfer_id(), new_transfer_id()
    pb, db = [0, 1, 2, 3, 4, 5], [47, 46, 45, 44, 43, 42]
    pa.sender.open(tid, {0: pb})
    pa.sender.layer_ready(tid, p.names[0], 0, len(pb))
    da.receiver.start(tid, hold.address, {0: db}, {0: 0})
    wait_for(lambda: np.array_equal(d.view(0)[db], p.view(0)[pb]), "layer 0")
    # The other layers leave P but are still "on the wire" when D cancels.
    hold.hold()
    for name in p.names[1:]:
        pa.sender.layer_ready(tid, name, 0, len(pb))
    pa.sender.complete(tid, {0: len(pb)})
    pa.sender.seal(tid, True, 30.0)
    wait_for(lambda: hold.holds((len(p.names) - 1) * len(pb) * p.page_bytes), "P to send the remaining layers")
    da.receiver.cancel(tid)
    fenced = d.pool.copy()  # nothing is being written: P's frames are all held
    wait_released(pa, tid)  # P got the CANCEL and frees its blocks

    def deliver_stale_frames() -> None:
        # The held DATA (and DONE) frames reach D; then a second transfer on the same
        # connections: once it is in, every frame sent before it has been handled.
        hold.release()
        send_all(pa, tid2, p, [20, 21])
        da.receiver.start(tid2, hold.address, {0: [10, 11]}, {0: 0})

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
        assert wait_transfers(da, tid, tid2) == {tid: ("failed", "cancelled by the engine"), tid2: ("done", "")}
    np.testing.assert_array_equal(d.pool, expected_after(p, [20, 21], d, [10, 11], base=fenced))
    assert da.receiver.poll() == (set(), {})
    wait_released(pa, tid2)
