"""GPU cases: GPU0 -> GPU1 across processes, GPU <-> pinned host, and the layer-wise overlap.

Every ceiling is measured in the same run on the same devices: a contiguous peer copy (through
the same CUDA IPC mapping) for GPU0 -> GPU1, a contiguous pinned copy for GPU <-> host. Copy
rates are device time (CUDA events around the one launch); the transport row is the wall time
of ``send_data``, which adds the go/end round trip with the receiving process.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.bench import KIB
from llumnix_kv_core.bench import WAIT_S
from llumnix_kv_core.bench import from_child
from llumnix_kv_core.bench import rate_row
from llumnix_kv_core.bench.frames import FrameCounter
from llumnix_kv_core.bench.offload import host_cases
from llumnix_kv_core.bench.timing import device_time
from llumnix_kv_core.bench.timing import fill_random
from llumnix_kv_core.bench.timing import pick
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.wire import Kind
from llumnix_kv_core.wire import new_transfer_id
from llumnix_kv_transport_shm.bench import layerwise
from llumnix_kv_transport_shm.export import export_regions

GOAL_P2P = 0.90  # at 16 KiB and 64 KiB blocks


def _config() -> TransportConfig:
    return TransportConfig(connect_timeout_s=60.0, io_timeout_s=60.0, connections_per_peer=1)


def _receiver_main(q_in: Any, q_out: Any, pool_bytes: int) -> None:
    """GPU1: a registered pool, connected to the sender's shm listener; counts frames until told to stop."""
    import traceback

    try:
        cuda = native.cuda()
        cuda.set_device(1)
        pool = cuda.malloc(pool_bytes)
        cuda.memset(pool, 0, pool_bytes)
        memory = MemoryRegistry()
        memory.register(MemoryRegion(0, pool, pool_bytes, "cuda:1"))
        handler = FrameCounter()
        transport = get_registry().transport("shm").factory(_config())
        peer = transport.connect(q_in.get(timeout=WAIT_S), handler, memory)
        peer.channels[0].send_control(Kind.HELLO, bytes(16), {})
        q_out.put(("ready", export_regions(memory).entries))  # cudaMalloc: legacy handles, no descriptors
        q_in.get(timeout=3600)
        q_out.put(("done", handler.frames))
        transport.close()
        cuda.free(pool)
    except BaseException:
        q_out.put(("error", traceback.format_exc()))


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
    fill_random(cuda, src_pool, pool_bytes)
    memory = MemoryRegistry()
    memory.register(MemoryRegion(0, src_pool, pool_bytes, "cuda:0"))
    handler = FrameCounter()
    transport = get_registry().transport("shm").factory(_config())
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver_main, args=(q_in, q_out, pool_bytes), daemon=True)
    rows: list[dict[str, Any]] = []
    stream = 0
    try:
        q_in.put(transport.listen("127.0.0.1", 0, handler, memory))
        child.start()
        _, table = from_child(q_out, "start-up")
        handler.wait(lambda: handler.channel is not None, "connect")
        ch = handler.channel
        peer_base = transport.mappings.base_of(table[0]["handle"], 0) + int(table[0]["offset"])
        cuda.set_device(0)
        stream = cuda.stream_create()
        rng = np.random.default_rng(7)
        for block in sizes:
            n, nbytes = blocks, blocks * block
            s_idx, d_idx = pick(rng, pool_bytes // block, n), pick(rng, pool_bytes // block, n)
            b = np.uint64(block)
            src, dst_off = np.uint64(src_pool) + s_idx * b, d_idx * b
            dst, lens = np.uint64(peer_base) + dst_off, np.full(n, block, np.uint64)
            goal = GOAL_P2P if block in (16 * KIB, 64 * KIB) else None
            ceiling = device_time(cuda, stream, repeat, cuda.memcpy_async, peer_base, src_pool, nbytes)
            kernel = device_time(cuda, stream, repeat, cuda.copy_segments, src, dst, lens)
            rows.append(rate_row("p2p-kernel", block, n, nbytes, kernel, ceiling, goal,
                                 f"GPU0->GPU1 across processes, one launch, device time; blocks spread over "
                                 f"{pool_bytes >> 30} GiB"))
            order = np.argsort(dst)
            by_dst = device_time(cuda, stream, repeat, cuda.copy_segments, src[order], dst[order], lens)
            rows.append(rate_row("p2p-kernel-sorted", block, n, nbytes, by_dst, ceiling, None,
                                 "same blocks, descriptors sorted by destination address"))
            span = max(1 << 30, 2 * nbytes)
            if span < pool_bytes:  # blocks of one 1 GiB layer region, as a request's blocks of one layer lie
                ls, ld = pick(rng, span // block, n) * b, pick(rng, span // block, n) * b
                near = device_time(cuda, stream, repeat, cuda.copy_segments, np.uint64(src_pool) + ls,
                                   np.uint64(peer_base) + ld, lens)
                rows.append(rate_row("p2p-kernel-1GiB", block, n, nbytes, near, ceiling, goal,
                                     f"blocks spread over {span >> 20} MiB of each pool (one layer's region)"))
            try:
                ce = device_time(cuda, stream, repeat, cuda.copy_segments_ce, src, dst, lens)
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
        rows += host_cases(cuda, stream, src_pool, pool_bytes, sizes, blocks, repeat, rng)
        q_in.put("stop")
        _, frames = from_child(q_out, "shut-down")
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
    rows += layerwise.run(cuda, repeat)
    return env, rows
