"""llumnix_kv_core._native_cuda: import without a driver, and GPU copies (marked gpu)."""

from __future__ import annotations

import ctypes
import importlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llumnix_kv_core import native
from llumnix_kv_core.errors import NativeUnavailableError


def _cuda_module():
    try:
        return importlib.import_module("llumnix_kv_core._native_cuda")
    except ModuleNotFoundError:
        return None


_CUDA = _cuda_module()
needs_module = pytest.mark.skipif(
    _CUDA is None, reason="llumnix_kv_core._native_cuda is not built (built without CUDA)"
)


def _device_problem() -> str | None:
    if _CUDA is None:
        return "llumnix_kv_core._native_cuda is not built (built without CUDA)"
    try:
        count = _CUDA.device_count()
    except RuntimeError as e:
        return f"no usable CUDA device: {e}"
    return None if count > 0 else "no CUDA device visible"


_PROBLEM = _device_problem()


def _skip_without_gpu():
    if _PROBLEM is not None:
        pytest.skip(_PROBLEM)


# ------------------------------------------------------------ no-GPU checks


@needs_module
def test_module_links_no_cuda_shared_libraries():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    out = subprocess.run([ldd, _CUDA.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in out
    assert "libcuda.so" not in out


@needs_module
def test_import_and_versions_without_device():
    assert _CUDA.runtime_version() >= 12000
    assert _CUDA.driver_version() >= 0
    assert _CUDA.IPC_HANDLE_BYTES == 64


@needs_module
@pytest.mark.skipif(native.implementation != "native", reason="the facade's CUDA access needs the compiled core")
def test_device_count_without_driver_raises_clean_error():
    if _CUDA.driver_version() != 0:
        pytest.skip("a CUDA driver is installed here")
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount failed: cudaError"):
        _CUDA.device_count()
    with pytest.raises(NativeUnavailableError, match="cudaGetDeviceCount failed: cudaError"):
        native.cuda()
    assert native.cuda(require_device=False) is _CUDA
    assert not native.has("cuda")


@needs_module
def test_copy_segments_validates_arguments_before_touching_cuda():
    a = np.zeros(2, dtype=np.uint64)
    with pytest.raises(ValueError, match="same length"):
        _CUDA.copy_segments(a, a, a[:1])
    with pytest.raises(ValueError, match="dtype uint64"):
        _CUDA.copy_segments(a, a, a.astype(np.int32))
    with pytest.raises(ValueError, match="null address"):
        _CUDA.copy_segments(a, a, np.ones(2, dtype=np.uint64))
    # Nothing to copy: no CUDA call at all, so this works without a driver.
    _CUDA.copy_segments(a, a, a)
    # Large tables are checked by several host threads; the first bad index is named.
    n = 50_000
    addrs = np.arange(1, n + 1, dtype=np.uint64) << np.uint64(20)
    lens = np.ones(n, dtype=np.uint64)
    bad = addrs.copy()
    bad[[30_001, 45_000]] = 0
    with pytest.raises(ValueError, match=r"dst_addrs\[30001\] is a null address"):
        _CUDA.copy_segments(addrs, bad, lens)
    wrap = addrs.copy()
    wrap[49_999] = np.uint64(2**64 - 1)
    with pytest.raises(ValueError, match=r"src_addrs\[49999\] \+ lengths\[49999\] wraps"):
        _CUDA.copy_segments(wrap, addrs, lens)
    _CUDA.copy_segments(bad, bad, np.zeros(n, dtype=np.uint64))


# ---------------------------------------------------------------- GPU tests


def _host_view(ptr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


def _to_device(cu, data: np.ndarray) -> int:
    ptr = cu.malloc(data.nbytes)
    cu.memcpy_htod(ptr, data.ctypes.data, data.nbytes)
    return ptr


def _from_device(cu, ptr: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint8)
    cu.memcpy_dtoh(out.ctypes.data, ptr, n)
    return out


def _random_table(rng, count, max_len, src_size, dst_size):
    """Non-overlapping destination ranges, random (unaligned) offsets and lengths."""
    lens = rng.integers(0, max_len + 1, size=count)
    gaps = rng.integers(0, 40, size=count)
    dst_off = np.cumsum(gaps + lens) - lens
    assert dst_off[-1] + lens[-1] <= dst_size
    src_off = rng.integers(0, src_size - max_len, size=count)
    return src_off.astype(np.uint64), dst_off.astype(np.uint64), lens.astype(np.uint64)


def _expected(src, dst, so, do, lens):
    out = dst.copy()
    for s, d, n in zip(so.tolist(), do.tolist(), lens.tolist(), strict=True):
        out[d : d + n] = src[s : s + n]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize(("count", "max_len"), [(1, 0), (7, 100), (300, 64 * 1024), (20000, 600), (3, 9 << 20)])
def test_device_to_device_scattered(count, max_len):
    _skip_without_gpu()
    cu = _CUDA
    rng = np.random.default_rng(count)
    src_size = max(max_len * 2 + 64, 1 << 20)
    dst_size = int(count * (max_len + 40)) + 64
    src = rng.integers(0, 256, size=src_size, dtype=np.uint8)
    dst0 = rng.integers(0, 256, size=dst_size, dtype=np.uint8)
    so, do, lens = _random_table(rng, count, max_len, src_size, dst_size)
    ds, dd = _to_device(cu, src), _to_device(cu, dst0)
    try:
        cu.copy_segments(so + np.uint64(ds), do + np.uint64(dd), lens)
        cu.synchronize()
        np.testing.assert_array_equal(_from_device(cu, dd, dst_size), _expected(src, dst0, so, do, lens))
    finally:
        cu.free(ds)
        cu.free(dd)


@pytest.mark.gpu
def test_pinned_host_and_device_on_stream():
    _skip_without_gpu()
    cu = _CUDA
    n = 8 << 20
    rng = np.random.default_rng(9)
    h_src, h_dst, d_buf = cu.malloc_host(n), cu.malloc_host(n), cu.malloc(n)
    stream, event = cu.stream_create(), cu.event_create()
    try:
        src = _host_view(h_src, n)
        src[:] = rng.integers(0, 256, size=n, dtype=np.uint8)
        _host_view(h_dst, n)[:] = 0
        # Pinned host -> device as 64 reversed 128 KiB blocks, then device -> pinned host back.
        blk = n // 64
        idx = np.arange(64, dtype=np.uint64)
        cu.copy_segments(
            np.uint64(h_src) + idx * np.uint64(blk),
            np.uint64(d_buf) + (np.uint64(63) - idx) * np.uint64(blk),
            np.full(64, blk, dtype=np.uint64),
            stream,
        )
        cu.copy_segments(np.array([d_buf], np.uint64), np.array([h_dst], np.uint64), np.array([n], np.uint64), stream)
        cu.event_record(event, stream)
        cu.event_synchronize(event)
        assert cu.event_query(event)
        expected = src.reshape(64, blk)[::-1].reshape(-1)
        np.testing.assert_array_equal(_host_view(h_dst, n), expected)
    finally:
        cu.event_destroy(event)
        cu.stream_destroy(stream)
        cu.free(d_buf)
        cu.free_host(h_src)
        cu.free_host(h_dst)


@pytest.mark.gpu
def test_many_launches_reuse_and_grow_descriptor_buffers():
    _skip_without_gpu()
    cu = _CUDA
    n = 1 << 20
    rng = np.random.default_rng(10)
    src = rng.integers(0, 256, size=n, dtype=np.uint8)
    ds, dd = _to_device(cu, src), cu.malloc(n)
    s1, s2, ev = cu.stream_create(), cu.stream_create(), cu.event_create()
    try:
        cu.memset(dd, 0, n)
        # Growing tables on one stream (more launches than staging slots), then a dependent stream.
        for count in (1, 10, 100, 1000, 4000, 16, 4096):
            size = n // count
            off = np.arange(count, dtype=np.uint64) * np.uint64(size)
            cu.copy_segments(off + np.uint64(ds), off + np.uint64(dd), np.full(count, size, np.uint64), s1)
        cu.event_record(ev, s1)
        cu.stream_wait_event(s2, ev)
        cu.copy_segments(np.array([dd], np.uint64), np.array([ds], np.uint64), np.array([n], np.uint64), s2)
        cu.synchronize(s2)
        np.testing.assert_array_equal(_from_device(cu, dd, n), src)
        np.testing.assert_array_equal(_from_device(cu, ds, n), src)
    finally:
        cu.event_destroy(ev)
        cu.stream_destroy(s1)
        cu.stream_destroy(s2)
        cu.free(ds)
        cu.free(dd)


@pytest.mark.gpu
def test_device_helpers_and_errors():
    _skip_without_gpu()
    cu = _CUDA
    dev = cu.get_device()
    cu.set_device(dev)
    assert native.has("cuda")
    assert native.has("cuda_copy")
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        cu.set_device(10_000)
    with pytest.raises(RuntimeError, match="cuda"):
        cu.malloc(1 << 62)
    with pytest.raises(ValueError, match="64 bytes"):
        cu.ipc_open_mem_handle(b"short")


@pytest.mark.gpu
def test_ipc_handle_in_another_process(tmp_path):
    _skip_without_gpu()
    cu = _CUDA
    n = 1 << 16
    data = np.arange(n, dtype=np.uint32).view(np.uint8)[:n]
    ptr = _to_device(cu, data)
    try:
        handle = cu.ipc_get_mem_handle(ptr)
        assert isinstance(handle, bytes)
        assert len(handle) == 64
        code = textwrap.dedent(
            f"""
            import numpy as np
            from llumnix_kv_core import _native_cuda as cu
            p = cu.ipc_open_mem_handle(bytes.fromhex({handle.hex()!r}))
            out = np.empty({n}, np.uint8)
            d = cu.malloc({n})
            cu.copy_segments(np.array([p], np.uint64), np.array([d], np.uint64), np.array([{n}], np.uint64))
            cu.synchronize()
            cu.memcpy_dtoh(out.ctypes.data, d, {n})
            cu.ipc_close_mem_handle(p)
            print(int(out.astype(np.uint64).sum()))
            """
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.strip()) == int(data.astype(np.uint64).sum())
    finally:
        cu.free(ptr)


@pytest.mark.gpu
def test_peer_copy_between_two_devices():
    _skip_without_gpu()
    cu = _CUDA
    if cu.device_count() < 2:
        pytest.skip("needs two GPUs")
    n = 4 << 20
    data = np.random.default_rng(12).integers(0, 256, size=n, dtype=np.uint8)
    cu.set_device(1)
    remote = _to_device(cu, data)
    cu.set_device(0)
    local = cu.malloc(n)
    try:
        cu.device_enable_peer_access(1)
        cu.device_enable_peer_access(1)  # already enabled: no error
        half = n // 2
        cu.copy_segments(
            np.array([remote + half, remote], np.uint64),
            np.array([local, local + half], np.uint64),
            np.array([half, half], np.uint64),
        )
        cu.synchronize()
        np.testing.assert_array_equal(_from_device(cu, local, n), np.concatenate([data[half:], data[:half]]))
    finally:
        cu.free(local)
        cu.set_device(1)
        cu.free(remote)
        cu.set_device(0)
