"""GPU memory over the shm transport: CUDA IPC, one gather/scatter kernel, events, CUDA graphs.

Two processes on two GPUs move blocks of vLLM-0.32-shaped caches ([B, H, N, C] views into one
int8 pool, LBNHC and LBHNC) with random data and check every byte. Needs two GPUs and torch.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest
from shm_testkit import child_message

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder

pytestmark = pytest.mark.gpu

CTX = mp.get_context("spawn")
WAIT_S = 45.0


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="the GPU tests build vLLM-shaped caches with torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    return torch




@pytest.fixture(scope="module", params=["LBNHC", "LBHNC"])
def remote(request, torch):
    """A receiving process on GPU1 with a vLLM-shaped cache in the given layout."""
    import gpu_testkit

    q_in, q_out = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=gpu_testkit.receiver_main, args=(q_in, q_out, request.param, 99), daemon=True)
    p.start()
    child_message(q_out, "start-up", WAIT_S)
    yield request.param, q_in, q_out
    q_in.put(("stop",))
    p.join(20)
    if p.is_alive():
        p.kill()
        p.join(5)


def _sender(torch, layout: str, seed: int = 5):
    import gpu_testkit

    torch.cuda.set_device(0)
    cache = gpu_testkit.VllmCache("cuda:0", layout, seed)
    a = gpu_testkit.agent(cache, "cuda:0")
    return cache, a, a.listen("127.0.0.1", 0)


def test_two_processes_two_gpus_byte_exact(torch, remote):
    import gpu_testkit

    layout, q_in, q_out = remote
    cache, a, address = _sender(torch, layout)
    try:
        rng = np.random.default_rng(1)
        for n in (1, 37, 200):  # one block, an odd count, most of the cache; random ids on both sides
            pb, db = gpu_testkit.random_blocks(rng, n), gpu_testkit.random_blocks(rng, n)
            expected = {name: gpu_testkit.page_bytes(cache.views[name], pb) for name in cache.names}
            tid = wire.new_transfer_id()
            a.sender.open(tid, {0: pb})
            q_in.put(("start", tid, address, db, expected))
            a.sender.complete(tid, {0: n})
            _, got_tid, equal, mismatched, _ = child_message(q_out, "check", WAIT_S)
            assert got_tid == tid
            assert equal, f"{layout}: layers differ after the transfer: {mismatched}"
            a.sender.seal(tid, True, 5.0)
        assert a.sender.bytes_sent == sum((1, 37, 200)) * len(cache.names) * cache.page_elems * 2
    finally:
        a.close()


def test_layerwise_overlap_with_a_synthetic_forward(torch, remote):
    """Each layer: a sleep kernel, then fresh writes into the layer's blocks, then an event.

    Byte-exactness proves the copies waited for the events (they read after the writes); the
    receiver finishing soon after the forward proves layers moved while later layers computed.
    """
    import gpu_testkit

    layout, q_in, q_out = remote
    cache, a, address = _sender(torch, layout, seed=6)
    cuda = native.cuda()
    events = [cuda.event_create() for _ in cache.names]
    try:
        rng = np.random.default_rng(2)
        n = 128
        pb, db = gpu_testkit.random_blocks(rng, n), gpu_testkit.random_blocks(rng, n)
        gen = torch.Generator().manual_seed(11)
        fresh = {name: torch.randint(-128, 128, (n, *cache.views[name].shape[1:-1], cache.views[name].shape[-1] * 2),
                                     dtype=torch.int8, generator=gen) for name in cache.names}
        expected = {name: fresh[name].clone() for name in cache.names}
        fresh_gpu = {name: t.to("cuda:0").view(torch.bfloat16) for name, t in fresh.items()}
        tid = wire.new_transfer_id()
        a.sender.open(tid, {0: pb})
        q_in.put(("start", tid, address, db, expected))
        time.sleep(0.5)  # attached before the forward starts
        stream = torch.cuda.current_stream()
        idx = torch.tensor(pb, device="cuda:0")
        t0 = time.monotonic()
        hook_s = []
        for name, ev in zip(cache.names, events):
            torch.cuda._sleep(20_000_000)  # ~10 ms at ~2 GHz: a layer's compute
            cache.views[name].index_copy_(0, idx, fresh_gpu[name])
            tr = time.monotonic()
            cuda.event_record(ev, stream.cuda_stream)
            a.sender.layer_ready(tid, name, 0, n, ready_event=ev)
            hook_s.append(time.monotonic() - tr)
        a.sender.complete(tid, {0: n})
        # A host sync here would wait for the queued ~10 ms layers; recording and queueing takes microseconds.
        assert sorted(hook_s)[len(hook_s) // 2] < 0.002, f"the per-layer hook blocked: {hook_s}"
        stream.synchronize()
        t_forward_end = time.monotonic()
        _, _, equal, mismatched, t_done = child_message(q_out, "check", WAIT_S)
        assert equal, f"{layout}: a layer was copied before its writes: {mismatched}"
        forward = t_forward_end - t0
        exposed = t_done - t_forward_end
        print(f"\n{layout}: forward {forward * 1e3:.1f} ms, exposed after the last layer {exposed * 1e3:.2f} ms")
        assert exposed < forward / 4, "the layers did not move while later layers computed"
        a.sender.seal(tid, True, 5.0)
    finally:
        a.close()
        for ev in events:
            cuda.event_destroy(ev)


def test_cuda_graph_capture_with_event_records_inside(torch, remote):
    """The forward (sleep + writes + one event record per layer) is captured once and replayed;
    after a replay the transfer moves exactly the data that replay wrote."""
    import gpu_testkit

    layout, q_in, q_out = remote
    cache, a, address = _sender(torch, layout, seed=7)
    cuda = native.cuda()
    events = [cuda.event_create() for _ in cache.names]
    try:
        rng = np.random.default_rng(3)
        n = 64
        pb, db = gpu_testkit.random_blocks(rng, n), gpu_testkit.random_blocks(rng, n)
        idx = torch.tensor(pb, device="cuda:0")
        staging = {name: torch.zeros((n, *cache.views[name].shape[1:]), dtype=torch.bfloat16, device="cuda:0")
                   for name in cache.names}
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            for name in cache.names:
                cache.views[name].index_copy_(0, idx, staging[name])
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            capture_stream = torch.cuda.current_stream().cuda_stream
            for name, ev in zip(cache.names, events):
                torch.cuda._sleep(10_000_000)
                cache.views[name].index_copy_(0, idx, staging[name])
                cuda.event_record(ev, capture_stream)  # becomes an event-record node of the graph
        for round_ in range(2):
            gen = torch.Generator().manual_seed(100 + round_)
            new = {name: torch.randint(-128, 128, (n, *cache.views[name].shape[1:-1],
                                                   cache.views[name].shape[-1] * 2), dtype=torch.int8, generator=gen)
                   for name in cache.names}
            for name in cache.names:
                staging[name].copy_(new[name].to("cuda:0").view(torch.bfloat16))
            tid = wire.new_transfer_id()
            a.sender.open(tid, {0: pb})
            q_in.put(("start", tid, address, db, new))
            time.sleep(0.3)
            graph.replay()  # no host sync until the end
            for name, ev in zip(cache.names, events):
                a.sender.layer_ready(tid, name, 0, n, ready_event=ev)
            a.sender.complete(tid, {0: n})
            _, _, equal, mismatched, _ = child_message(q_out, "check", WAIT_S)
            assert equal, f"{layout}, replay {round_}: transferred data is not what the replay wrote: {mismatched}"
            a.sender.seal(tid, True, 5.0)
        torch.cuda.synchronize()
    finally:
        a.close()
        for ev in events:
            cuda.event_destroy(ev)


# ---------------------------------------------------------------- channel level, one process, two GPUs
@pytest.fixture
def gpu_pair(torch, make_transport):
    """(sender channel, receiver handler, src tensor on GPU0, dst tensor on GPU1)."""
    src = torch.randint(-128, 128, (64 << 20,), dtype=torch.int8, device="cuda:0")
    dst = torch.randint(-128, 128, (64 << 20,), dtype=torch.int8, device="cuda:1")
    smem, rmem = MemoryRegistry(), MemoryRegistry()
    smem.register(MemoryRegion(0, src.data_ptr(), src.numel(), "cuda:0"))
    rmem.register(MemoryRegion(4, dst.data_ptr(), dst.numel(), "cuda:1"))
    shand, rhand = Recorder(), Recorder()
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), rhand, rmem)
    peer.channels[0].send_control(wire.Kind.HELLO, bytes(16))  # shows the listener's end of the channel
    shand.wait(lambda r: len(r.controls) == 1)
    sch = shand.controls[0][0]
    return sch, rhand, src, dst


def _segments(rng, n, block, size):
    s = rng.choice(size // block, n, replace=False).astype(np.uint64) * np.uint64(block)
    d = rng.choice(size // block, n, replace=False).astype(np.uint64) * np.uint64(block)
    return s, d, np.full(n, block, np.uint64)


def test_scattered_gpu_frame_is_byte_exact_and_counted_after_the_copy(gpu_pair, torch):
    sch, rhand, src, dst = gpu_pair
    rng = np.random.default_rng(4)
    s, d, lens = _segments(rng, 4096, 16 << 10, 64 << 20)
    before = dst.cpu()
    sent = sch.send_data(wire.new_transfer_id(), 4, np.uint64(src.data_ptr()) + s, np.full(4096, 4, np.uint64), d,
                         lens)
    assert sent == int(lens.sum())
    rhand.wait(lambda r: len(r.data) == 1)
    want = before.clone()
    src_cpu = src.cpu()
    for a, b in zip(s.tolist(), d.tolist()):
        want[b:b + (16 << 10)] = src_cpu[a:a + (16 << 10)]
    assert torch.equal(dst.cpu(), want)


def test_fenced_gpu_frame_is_not_written(torch, make_transport):
    src = torch.full((1 << 20,), 7, dtype=torch.int8, device="cuda:0")
    dst = torch.zeros((1 << 20,), dtype=torch.int8, device="cuda:1")
    smem, rmem = MemoryRegistry(), MemoryRegistry()
    smem.register(MemoryRegion(0, src.data_ptr(), src.numel(), "cuda:0"))
    rmem.register(MemoryRegion(1, dst.data_ptr(), dst.numel(), "cuda:1"))
    fenced = wire.new_transfer_id()
    shand, rhand = Recorder(), Recorder(refuse={bytes.fromhex(fenced)})
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, smem), rhand, rmem)
    peer.channels[0].send_control(wire.Kind.HELLO, bytes(16))
    shand.wait(lambda r: len(r.controls) == 1)
    sch = shand.controls[0][0]
    args = (np.array([src.data_ptr()], np.uint64), np.ones(1, np.uint64), np.zeros(1, np.uint64),
            np.array([1 << 20], np.uint64))
    sch.send_data(fenced, 0, *args)
    assert int(dst.abs().sum()) == 0, "a fenced frame was written"
    assert not rhand.data
    ok = wire.new_transfer_id()
    sch.send_data(ok, 0, *args)
    rhand.wait(lambda r: len(r.data) == 1)
    assert bool((dst == 7).all())


def test_gpu_frame_from_unregistered_source_is_refused_before_sending(gpu_pair, torch):
    sch, rhand, _src, _dst = gpu_pair
    host = np.zeros(4096, np.uint8)
    one = np.ones(1, np.uint64)
    with pytest.raises(TransferError, match="not inside registered GPU memory"):
        sch.send_data(wire.new_transfer_id(), 0, np.array([host.ctypes.data], np.uint64), one * 4,
                      np.zeros(1, np.uint64), np.array([4096], np.uint64))
    assert not sch.closed
    assert not rhand.data
