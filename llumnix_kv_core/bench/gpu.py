"""GPU cases: GPU0 -> GPU1 across processes, GPU <-> pinned host, and the layer-wise overlap.

Every ceiling is measured in the same run on the same devices: a contiguous peer copy (through
the same CUDA IPC mapping) for GPU0 -> GPU1, a contiguous pinned copy for GPU <-> host. Copy
rates are device time (CUDA events around the one launch); the transport row is the wall time
of ``send_data``, which adds the go/end round trip with the receiving process.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.bench import KIB
from llumnix_kv_core.bench import MIB
from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.interfaces.transport import Channel
from llumnix_kv_core.interfaces.transport import FrameHandler
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id

GOAL_P2P = 0.90  # at 16 KiB and 64 KiB blocks
GOAL_HOST = 0.90
WAIT_S = 120.0
HOST_CAP = 4 << 30  # pinned bytes per host case

# Layer-wise case: 32 layers of vLLM-shaped pages ([B, H=8, N=16, C=256 x 2 bytes] LBNHC = 64 KiB),
# 512 blocks per layer (32 MiB), 1 ms of synthetic compute per layer.
LW_LAYERS, LW_BLOCKS, LW_POOL_BLOCKS, LW_HEADS, LW_TOKENS, LW_C = 32, 512, 1024, 8, 16, 256
LW_COMPUTE_NS = 1_000_000


def _config(connections: int = 1) -> TransportConfig:
    return TransportConfig(connect_timeout_s=60.0, io_timeout_s=60.0, connections_per_peer=connections)


class _Handler(FrameHandler):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.frames = 0
        self.channel: Channel | None = None

    def accept_data(self, transfer_id: bytes, layer: int) -> bool:
        return True

    def on_data(self, channel: Channel, transfer_id: bytes, layer: int, nbytes: int, n_segments: int) -> None:
        with self.cond:
            self.frames += 1
            self.cond.notify_all()

    def on_control(self, channel: Channel, kind: Kind, transfer_id: bytes, body: dict[str, Any]) -> None:
        with self.cond:
            self.channel = channel
            self.cond.notify_all()

    def on_closed(self, channel: Channel, error: BaseException | None) -> None:
        pass


def _get(q: Any, what: str) -> Any:
    msg = q.get(timeout=WAIT_S)
    if msg[0] == "error":
        raise RuntimeError(f"benchmark child failed during {what}: {msg[1]}")
    return msg


def _receiver_main(q_in: Any, q_out: Any, pool_bytes: int) -> None:
    """GPU1: a registered pool, connected to the sender's shm listener; counts frames until told to stop."""
    import traceback

    try:
        from llumnix_kv_transport_shm.ipc import export_regions

        cuda = native.cuda()
        cuda.set_device(1)
        pool = cuda.malloc(pool_bytes)
        cuda.memset(pool, 0, pool_bytes)
        memory = MemoryRegistry()
        memory.register(MemoryRegion(0, pool, pool_bytes, "cuda:1"))
        handler = _Handler()
        transport = get_registry().transport("shm").factory(_config())
        peer = transport.connect(q_in.get(timeout=WAIT_S), handler, memory)
        peer.channels[0].send_control(Kind.HELLO, bytes(16), {})
        q_out.put(("ready", export_regions(memory)))
        q_in.get(timeout=3600)
        q_out.put(("done", handler.frames))
        transport.close()
        cuda.free(pool)
    except BaseException:
        q_out.put(("error", traceback.format_exc()))


def _device_time(cuda: Any, stream: int, repeat: int, fn: Callable[..., None], *args: Any) -> float:
    """Median seconds of ``fn(*args, stream)``'s work on ``stream``, timed with CUDA events (one warm-up).

    A short spin kernel is queued first, so the start event fires once the copy is already queued:
    the time is the copy's, not the host's time to build and submit it.
    """
    start, end = cuda.event_create_timed(), cuda.event_create_timed()
    try:
        fn(*args, stream)
        cuda.synchronize(stream)
        times = []
        for _ in range(repeat):
            cuda.spin(300_000, 1, stream)
            cuda.event_record(start, stream)
            fn(*args, stream)
            cuda.event_record(end, stream)
            cuda.event_synchronize(end)
            times.append(cuda.event_elapsed_ms(start, end) / 1e3)
        return statistics.median(times)
    finally:
        cuda.event_destroy(start)
        cuda.event_destroy(end)


def _fill_random(cuda: Any, addr: int, nbytes: int) -> None:
    chunk = np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8)
    for off in range(0, nbytes, chunk.nbytes):
        cuda.memcpy_htod(addr + off, chunk.ctypes.data, min(chunk.nbytes, nbytes - off))


def _pick(rng: np.random.Generator, slots: int, n: int) -> np.ndarray:
    return np.sort(rng.choice(slots, size=n, replace=False)).astype(np.uint64)[rng.permutation(n)]


def run(sizes: list[int], blocks: int, repeat: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cuda = native.cuda()
    if cuda.device_count() < 2:
        msg = "the GPU cases need two GPUs (GPU0 -> GPU1 across processes); this host shows fewer"
        raise RuntimeError(msg)
    env = {"devices": [cuda.device_name(0), cuda.device_name(1)], "sms": cuda.sm_count(0),
           "driver": cuda.driver_version(), "runtime": cuda.runtime_version(),
           "peer_access": cuda.device_can_access_peer(0, 1)}
    pool_bytes = blocks * max(sizes)
    cuda.set_device(0)
    src_pool = cuda.malloc(pool_bytes)
    _fill_random(cuda, src_pool, pool_bytes)
    memory = MemoryRegistry()
    memory.register(MemoryRegion(0, src_pool, pool_bytes, "cuda:0"))
    handler = _Handler()
    transport = get_registry().transport("shm").factory(_config())
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver_main, args=(q_in, q_out, pool_bytes), daemon=True)
    rows: list[dict[str, Any]] = []
    stream = 0
    try:
        q_in.put(transport.listen("127.0.0.1", 0, handler, memory))
        child.start()
        _, table = _get(q_out, "start-up")
        with handler.cond:
            handler.cond.wait_for(lambda: handler.channel is not None, WAIT_S)
        ch = handler.channel
        assert ch is not None
        peer_base = transport.mappings.base_of(table[0]["handle"], 0) + int(table[0]["offset"])
        cuda.set_device(0)
        stream = cuda.stream_create()
        rng = np.random.default_rng(7)
        for block in sizes:
            n, nbytes = blocks, blocks * block
            s_idx, d_idx = _pick(rng, pool_bytes // block, n), _pick(rng, pool_bytes // block, n)
            b = np.uint64(block)
            src, dst_off = np.uint64(src_pool) + s_idx * b, d_idx * b
            dst, lens = np.uint64(peer_base) + dst_off, np.full(n, block, np.uint64)
            goal = GOAL_P2P if block in (16 * KIB, 64 * KIB) else None
            ceiling = _device_time(cuda, stream, repeat, cuda.memcpy_async, peer_base, src_pool, nbytes)
            kernel = _device_time(cuda, stream, repeat, cuda.copy_segments, src, dst, lens)
            rows.append(rate_row("p2p-kernel", block, n, nbytes, kernel, ceiling, goal,
                                 f"GPU0->GPU1 across processes, one launch, device time; blocks spread over "
                                 f"{pool_bytes >> 30} GiB"))
            order = np.argsort(dst)
            by_dst = _device_time(cuda, stream, repeat, cuda.copy_segments, src[order], dst[order], lens)
            rows.append(rate_row("p2p-kernel-sorted", block, n, nbytes, by_dst, ceiling, None,
                                 "same blocks, descriptors sorted by destination address"))
            span = max(1 << 30, 2 * nbytes)
            if span < pool_bytes:  # blocks of one 1 GiB layer region, as a request's blocks of one layer lie
                ls, ld = _pick(rng, span // block, n) * b, _pick(rng, span // block, n) * b
                near = _device_time(cuda, stream, repeat, cuda.copy_segments, np.uint64(src_pool) + ls,
                                    np.uint64(peer_base) + ld, lens)
                rows.append(rate_row("p2p-kernel-1GiB", block, n, nbytes, near, ceiling, goal,
                                     f"blocks spread over {span >> 20} MiB of each pool (one layer's region)"))
            try:
                ce = _device_time(cuda, stream, repeat, cuda.copy_segments_ce, src, dst, lens)
                rows.append(rate_row("p2p-copy-engines", block, n, nbytes, ce, ceiling, None,
                                     "cudaMemcpyBatchAsync, one call, device time"))
            except RuntimeError as exc:
                rows.append({"case": "p2p-copy-engines", "block_bytes": block, "note": f"failed: {exc}"})
            regions = np.zeros(n, np.uint64)
            walls = []
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                ch.send_data(new_transfer_id(), 0, src, regions, dst_off, lens)
                walls.append(time.perf_counter() - t0)
            rows.append(rate_row("p2p-transport", block, n, nbytes, statistics.median(walls[1:]), ceiling, None,
                                 "shm channel send_data wall time: go/end round trip + kernel"))
        rows += _host_cases(cuda, stream, src_pool, pool_bytes, sizes, blocks, repeat, rng)
        q_in.put("stop")
        _, frames = _get(q_out, "shut-down")
        if frames != len(sizes) * (repeat + 1):
            msg = f"the receiving process counted {frames} frames, expected {len(sizes) * (repeat + 1)}"
            raise RuntimeError(msg)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
        transport.close()
        if stream:
            cuda.stream_destroy(stream)
        cuda.free(src_pool)
    rows += layerwise(cuda, repeat)
    return env, rows


def _host_cases(cuda, stream, src_pool, pool_bytes, sizes, blocks, repeat, rng) -> list[dict[str, Any]]:
    rows = []
    host_bytes = min(pool_bytes, HOST_CAP)
    pinned = cuda.malloc_host(host_bytes)
    try:
        for block in sizes:
            n = min(blocks, host_bytes // block)
            nbytes, b = n * block, np.uint64(block)
            dev = np.uint64(src_pool) + _pick(rng, pool_bytes // block, n) * b
            host = np.uint64(pinned) + _pick(rng, host_bytes // block, n) * b
            lens = np.full(n, block, np.uint64)
            for case, s, d, to, frm in (("d2h", dev, host, pinned, src_pool), ("h2d", host, dev, src_pool, pinned)):
                goal = GOAL_HOST if case == "d2h" else None
                ceiling = _device_time(cuda, stream, repeat, cuda.memcpy_async, to, frm, nbytes)
                k = _device_time(cuda, stream, repeat, cuda.copy_segments, s, d, lens)
                rows.append(rate_row(f"{case}-kernel", block, n, nbytes, k, ceiling, goal,
                                     "scattered blocks, one launch vs contiguous pinned copy"))
                try:
                    ce = _device_time(cuda, stream, repeat, cuda.copy_segments_ce, s, d, lens)
                    rows.append(rate_row(f"{case}-copy-engines", block, n, nbytes, ce, ceiling, goal,
                                         "scattered blocks, cudaMemcpyBatchAsync vs contiguous pinned copy"))
                except RuntimeError as exc:
                    rows.append({"case": f"{case}-copy-engines", "block_bytes": block, "note": f"failed: {exc}"})
    finally:
        cuda.free_host(pinned)
    return rows


# ------------------------------------------------------------------------------------- layer-wise
def _lw_layout(addr: int) -> KVLayout:
    cb = LW_C * 2
    page = LW_HEADS * LW_TOKENS * cb
    strides = (page, cb, LW_HEADS * cb, 2)  # LBNHC: [B][N][H][C] in memory, viewed as [B, H, N, C]
    tensors = tuple(
        tensor_layout_from_bhnc(TensorDescription(f"model.layers.{i}.self_attn", addr + i * LW_POOL_BLOCKS * page,
                                                  (LW_POOL_BLOCKS, LW_HEADS, LW_TOKENS, LW_C), strides, 2))
        for i in range(LW_LAYERS))
    return KVLayout("flash_attn", 0, "attention", LW_TOKENS, tensors, {"layout": "LBNHC", "page": page})


def _lw_pool_bytes() -> int:
    return LW_LAYERS * LW_POOL_BLOCKS * LW_HEADS * LW_TOKENS * LW_C * 2


def _lw_receiver_main(q_in: Any, q_out: Any) -> None:
    import traceback

    try:
        from llumnix_kv_core.agent import KVAgent

        cuda = native.cuda()
        cuda.set_device(1)
        nbytes = _lw_pool_bytes()
        pool = cuda.malloc(nbytes)
        cuda.memset(pool, 0, nbytes)
        layout = _lw_layout(pool)
        agent = KVAgent(get_registry().transport("shm").factory(_config(2)), [layout], {"bench": "layerwise"},
                        timeout_s=60.0, device="cuda:1")
        q_out.put(("ready", None))
        while True:
            cmd = q_in.get(timeout=3600)
            if cmd[0] == "stop":
                break
            _, tid, address, dblocks = cmd
            agent.receiver.start(tid, address, {0: dblocks}, {0: 0})
            deadline = time.monotonic() + WAIT_S
            while True:
                done, failed = agent.receiver.poll()
                if done or failed or time.monotonic() > deadline:
                    break
                time.sleep(20e-6)
            q_out.put(("done", time.monotonic(), sorted(done), failed))
        agent.close()
        cuda.free(pool)
    except BaseException:
        q_out.put(("error", traceback.format_exc()))


def layerwise(cuda: Any, repeat: int) -> list[dict[str, Any]]:
    """Exposed transfer time after the last layer vs one layer's transfer time (agent + shm + events)."""
    from llumnix_kv_core.agent import KVAgent

    cuda.set_device(0)
    nbytes = _lw_pool_bytes()
    pool = cuda.malloc(nbytes)
    _fill_random(cuda, pool, nbytes)
    layout = _lw_layout(pool)
    agent = KVAgent(get_registry().transport("shm").factory(_config(2)), [layout], {"bench": "layerwise"},
                    timeout_s=60.0, device="cuda:0")
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_lw_receiver_main, args=(q_in, q_out), daemon=True)
    compute = cuda.stream_create()
    events = [cuda.event_create() for _ in range(LW_LAYERS)]
    end = cuda.event_create()
    sms = cuda.sm_count(0)
    names = [t.name for t in layout.tensors]
    rng = np.random.default_rng(3)
    try:
        address = agent.listen("127.0.0.1", 0)
        child.start()
        _get(q_out, "layer-wise start-up")

        def transfer(compute_ns: int) -> tuple[float, float, float]:
            tid = new_transfer_id()
            pb = rng.choice(LW_POOL_BLOCKS, LW_BLOCKS, replace=False).tolist()
            db = rng.choice(LW_POOL_BLOCKS, LW_BLOCKS, replace=False).tolist()
            agent.sender.open(tid, {0: pb})
            q_in.put(("start", tid, address, db))
            time.sleep(0.3)  # the receiver's PULL attaches it before the forward starts
            t0 = time.monotonic()
            for i, name in enumerate(names):
                if compute_ns:
                    cuda.spin(compute_ns, sms, compute)
                cuda.event_record(events[i], compute)
                agent.sender.layer_ready(tid, name, 0, LW_BLOCKS, ready_event=events[i])
            agent.sender.complete(tid, {0: LW_BLOCKS})
            cuda.event_record(end, compute)
            cuda.event_synchronize(end)
            t_fwd = time.monotonic()
            _, t_done, done, failed = _get(q_out, "a layer-wise transfer")
            if done != [tid] or failed:
                msg = f"layer-wise transfer failed: {failed or 'no completion'}"
                raise RuntimeError(msg)
            agent.sender.seal(tid, True, 1.0)
            return t_fwd - t0, t_done - t_fwd, t_done - t0

        transfer(0)  # warm-up: connection, handshake, IPC mapping
        idle = [transfer(0)[2] for _ in range(max(3, repeat // 2))]
        runs = [transfer(LW_COMPUTE_NS) for _ in range(max(3, repeat // 2))]
        q_in.put(("stop",))
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
        agent.close()
        for e in (*events, end):
            cuda.event_destroy(e)
        cuda.stream_destroy(compute)
        cuda.free(pool)
    per_layer = statistics.median(idle) / LW_LAYERS
    exposed = statistics.median(r[1] for r in runs)
    forward = statistics.median(r[0] for r in runs)
    layer_bytes = LW_BLOCKS * LW_HEADS * LW_TOKENS * LW_C * 2
    row = rate_row("layerwise", layer_bytes // LW_BLOCKS, LW_BLOCKS * LW_LAYERS, layer_bytes * LW_LAYERS,
                   statistics.median(idle), None, None,
                   f"{LW_LAYERS} layers, {LW_COMPUTE_NS / 1e6:g} ms compute each: forward {forward * 1e3:.1f} ms, "
                   f"exposed after last layer {exposed * 1e3:.3f} ms vs one layer's transfer {per_layer * 1e3:.3f} ms")
    row.update(exposed_s=exposed, per_layer_transfer_s=per_layer, forward_s=forward, goal="exposed <= 1 layer",
               met=exposed <= per_layer, ratio=exposed / per_layer)
    return [row]
