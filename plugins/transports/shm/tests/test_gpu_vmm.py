"""GPU memory between two processes of one GPU: exported virtual memory (VMM) and legacy CUDA IPC.

vLLM 0.34 backs each layer of its KV cache with one exportable cuMemCreate allocation (the
extensible KV cache); vLLM 0.32 uses one cudaMalloc pool. Every test runs on one GPU: the
processes share it, so nothing here needs peer access. Data is random and checked byte for byte.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import gpu_testkit
import numpy as np
import pytest
import vmm_testkit
from llumnix_kv_transport_shm.fd_channel import receive_fds
from shm_testkit import child_message
from shm_testkit import reap

from llumnix_kv_core import native
from llumnix_kv_core import wire
from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry
from llumnix_kv_core.testing.frames import Recorder

pytestmark = pytest.mark.gpu

CTX = mp.get_context("spawn")
WAIT_S = 60.0
VMM_PATH = "GPU memory through exported VMM handles"
LEGACY_PATH = "GPU memory through legacy CUDA IPC"






@pytest.fixture
def cu():
    cuda = native.cuda()
    cuda.set_device(0)
    return cuda


def test_native_export_and_import_across_processes(cu):
    size = 3 * cu.vmm_granularity(0)
    q_in, q_out = CTX.Queue(), CTX.Queue()
    owner = CTX.Process(target=vmm_testkit.owner_main, args=(q_in, q_out, size, 21), daemon=True)
    owner.start()
    try:
        _, name, pid, at_base, exported = child_message(q_out, "offer", WAIT_S)
        assert at_base
        assert exported == size
        (fd,) = receive_fds(name, 1, pid, timeout_s=10.0)
        try:
            ptr = cu.vmm_import(fd, size, 0)
        finally:
            os.close(fd)
        try:
            got = np.empty(size, dtype=np.uint8)
            cu.memcpy_dtoh(got.ctypes.data, ptr, size)
            want = np.random.default_rng(21).integers(0, 256, size, dtype=np.uint8)
            np.testing.assert_array_equal(got, want)
            cu.memset(ptr + 4096, 0x5A, 65536)
            cu.synchronize(0)
            q_in.put((4096, 65536, 0x5A))
            seen = child_message(q_out, "seen", WAIT_S)
            assert seen == ("seen", True), "the owner does not see what the importer wrote"
        finally:
            cu.vmm_unmap(ptr, size)
    finally:
        reap(owner)


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("vmm", "vmm"), ("vmm", "malloc"), ("malloc", "vmm"),
                                                    ("malloc", "malloc")])
def test_receiver_pulls_scattered_blocks_byte_exact(cu, caplog, src_kind, dst_kind):
    """P (a child, ``src_kind``) pushes the blocks D (this process, ``dst_kind``) pulls, through the agent.

    P writes into D's memory: through D's exported allocations when D is VMM, else through D's
    legacy handle. Each side logs the path it uses to reach the other's memory.
    """
    caplog.set_level("INFO", logger="llumnix_kv_transport_shm")
    q_in, q_out = CTX.Queue(), CTX.Queue()
    sender = CTX.Process(target=vmm_testkit.sender_main, args=(q_in, q_out, src_kind, 31), daemon=True)
    sender.start()
    cache = a = None
    try:
        _, address, _pid = child_message(q_out, "start-up", WAIT_S)
        cache = vmm_testkit.RawCache(dst_kind, 32)
        a = gpu_testkit.agent(cache, "cuda:0")
        src = vmm_testkit.initial_layers(31)
        want = vmm_testkit.initial_layers(32)
        rng = np.random.default_rng(5)
        for n in (1, 37, 100):
            pb = gpu_testkit.random_blocks(rng, n, vmm_testkit.BLOCKS)
            db = gpu_testkit.random_blocks(rng, n, vmm_testkit.BLOCKS)
            tid = wire.new_transfer_id()
            q_in.put(("offer", tid, pb))
            child_message(q_out, "offered", WAIT_S)
            a.receiver.start(tid, address, {0: db}, {0: 0})
            gpu_testkit.wait_done(a, tid)
            for w, s in zip(want, src):
                w[db] = s[pb]
            got = cache.read()
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if not np.array_equal(g, w)]
            assert not bad, f"{src_kind} -> {dst_kind}, {n} blocks: layers {bad} differ"
            q_in.put(("seal", tid))
            child_message(q_out, "sealed", WAIT_S)
        a.close()
        a = None
        q_in.put(("stop",))
        _, sender_log = child_message(q_out, "stop", WAIT_S)
    finally:
        if a is not None:
            a.close()
        if cache is not None:
            cache.free()
        reap(sender)
    mine = [r.getMessage() for r in caplog.records]
    assert any((VMM_PATH if src_kind == "vmm" else LEGACY_PATH) in m for m in mine), mine
    assert any((VMM_PATH if dst_kind == "vmm" else LEGACY_PATH) in m for m in sender_log), sender_log


def test_reconnects_leave_no_mapping_behind(cu):
    """Each round maps D's fresh VMM cache in P; once D disconnects and frees it, the GPU memory comes back."""
    blocks = 8192  # 128 MiB per layer, 512 MiB per cache
    q_in, q_out = CTX.Queue(), CTX.Queue()
    sender = CTX.Process(target=vmm_testkit.sender_main, args=(q_in, q_out, "vmm", 41, blocks), daemon=True)
    sender.start()
    try:
        _, address, _pid = child_message(q_out, "start-up", WAIT_S)
        baseline, _ = cu.mem_get_info()
        rng = np.random.default_rng(6)
        for round_ in range(3):
            cache = vmm_testkit.RawCache("vmm", 42 + round_, blocks=blocks)
            a = gpu_testkit.agent(cache, "cuda:0")
            try:
                pb, db = gpu_testkit.random_blocks(rng, 16, blocks), gpu_testkit.random_blocks(rng, 16, blocks)
                tid = wire.new_transfer_id()
                q_in.put(("offer", tid, pb))
                child_message(q_out, "offered", WAIT_S)
                a.receiver.start(tid, address, {0: db}, {0: 0})
                gpu_testkit.wait_done(a, tid)
                q_in.put(("seal", tid))
                child_message(q_out, "sealed", WAIT_S)
            finally:
                a.close()
                cache.free()
            deadline = time.monotonic() + 15.0
            while (free := cu.mem_get_info()[0]) < baseline - (256 << 20) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert free >= baseline - (256 << 20), (
                f"round {round_}: {(baseline - free) >> 20} MiB still held after D closed and freed its cache: "
                "P kept D's memory mapped")
        q_in.put(("stop",))
        child_message(q_out, "stop", WAIT_S)
    finally:
        reap(sender)


# ---------------------------------------------------------------- one process


def _pair(make_transport, src: MemoryRegistry, dst: MemoryRegistry):
    """(the listener's channel, the connecting side's handler, both transports)."""
    shand, rhand = Recorder(), Recorder()
    srv, cli = make_transport(), make_transport(connections_per_peer=1)
    peer = cli.connect(srv.listen("127.0.0.1", 0, shand, src), rhand, dst)
    peer.channels[0].send_control(wire.Kind.HELLO, bytes(16))  # shows the listener's end of the channel
    shand.wait(lambda r: len(r.controls) == 1)
    return shand.controls[0][0], rhand, (srv, cli)


def test_vmm_memory_of_this_process_moves_through_its_pointers(cu, make_transport):
    size = 4 << 20
    src, dst = cu.vmm_alloc(0, size), cu.vmm_alloc(0, size)
    try:
        data = np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8)
        cu.memcpy_htod(src, data.ctypes.data, size)
        cu.memset(dst, 0, size)
        smem, rmem = MemoryRegistry(), MemoryRegistry()
        smem.register(MemoryRegion(0, src, size, "cuda:0"))
        rmem.register(MemoryRegion(3, dst, size, "cuda:0"))
        sch, rhand, transports = _pair(make_transport, smem, rmem)
        s_off = np.array([0, 1 << 20, 3 << 20], np.uint64)
        d_off = np.array([2 << 20, 0, 1 << 20], np.uint64)
        lens = np.full(3, 1 << 20, np.uint64)
        sch.send_data(wire.new_transfer_id(), 0, np.uint64(src) + s_off, np.full(3, 3, np.uint64), d_off, lens)
        rhand.wait(lambda r: len(r.data) == 1)
        got = np.empty(size, dtype=np.uint8)
        cu.memcpy_dtoh(got.ctypes.data, dst, size)
        want = np.zeros(size, np.uint8)
        for s, d in zip(s_off.tolist(), d_off.tolist()):
            want[d:d + (1 << 20)] = data[s:s + (1 << 20)]
        np.testing.assert_array_equal(got, want)
        for t in transports:
            t.close()  # before the memory goes
    finally:
        cu.vmm_free(src)
        cu.vmm_free(dst)


def test_vmm_memory_created_without_an_exportable_handle_fails_the_handshake(cu, make_transport):
    closed = cu.vmm_alloc(0, 2 << 20, exportable=False)
    try:
        bad, good = MemoryRegistry(), MemoryRegistry()
        bad.register(MemoryRegion(0, closed, 2 << 20, "cuda:0"))
        # The connecting side cannot export its own memory: nothing is sent.
        srv = make_transport()
        address = srv.listen("127.0.0.1", 0, Recorder(), good)
        cause = r"created without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in its requestedHandleTypes.*exports_fd"
        with pytest.raises(TransferError, match=r"cannot export GPU region 0 \(cuda:0\) to the shm peer: .*" + cause):
            make_transport().connect(address, Recorder(), bad)
        # The listening side cannot: it refuses, naming the cause.
        srv2 = make_transport()
        address2 = srv2.listen("127.0.0.1", 0, Recorder(), bad)
        with pytest.raises(TransferError, match=r"refused the connection: cannot export GPU region 0 .*" + cause):
            make_transport().connect(address2, Recorder(), good)
    finally:
        cu.vmm_free(closed)
