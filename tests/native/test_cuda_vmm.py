"""Virtual-memory functions of llumnix_kv_core._native_cuda: no driver, and one process on a GPU (marked gpu).

Two processes exchanging exported memory are tested with the shm transport
(plugins/transports/shm/tests/test_gpu_vmm.py).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest


def _cuda_module():
    try:
        return importlib.import_module("llumnix_kv_core._native_cuda")
    except ModuleNotFoundError:
        return None


_CUDA = _cuda_module()
needs_module = pytest.mark.skipif(
    _CUDA is None, reason="llumnix_kv_core._native_cuda is not built (built without CUDA)"
)


@needs_module
def test_capability_and_argument_checks_before_any_cuda_call():
    assert "cuda_vmm" in _CUDA.capabilities()
    with pytest.raises(ValueError, match="open file descriptor"):
        _CUDA.vmm_import(-1, 1 << 21, 0)
    with pytest.raises(ValueError, match="size"):
        _CUDA.vmm_import(3, 0, 0)
    with pytest.raises(ValueError, match="above 0"):
        _CUDA.vmm_alloc(0, 0)


@needs_module
def test_without_driver_every_function_names_the_missing_driver():
    if _CUDA.driver_version() != 0:
        pytest.skip("a CUDA driver is installed here")
    calls = [
        lambda: _CUDA.is_vmm(1 << 30),
        lambda: _CUDA.vmm_export_fd(1 << 30),
        lambda: _CUDA.vmm_import(0, 1 << 21, 0),
        lambda: _CUDA.vmm_unmap(1 << 30, 1 << 21),
        lambda: _CUDA.vmm_alloc(0, 1 << 21),
        lambda: _CUDA.vmm_free(1 << 30),
        lambda: _CUDA.vmm_granularity(0),
    ]
    no_driver = r"cudaGetDriverEntryPointByVersion\(cu\w+\) failed: .*install the driver"
    for call in calls:
        with pytest.raises(RuntimeError, match=no_driver):
            call()
    # The failed lookups leave no error behind: a runtime call that needs no driver still works.
    assert _CUDA.runtime_version() >= 12000


# ---------------------------------------------------------------- one process on a GPU


def _upload(cu, ptr: int, data: np.ndarray) -> None:
    cu.memcpy_htod(ptr, data.ctypes.data, data.nbytes)


def _download(cu, ptr: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint8)
    cu.memcpy_dtoh(out.ctypes.data, ptr, n)
    return out


@pytest.fixture
def cu():
    from llumnix_kv_core import native

    cuda = native.cuda()
    cuda.set_device(0)
    return cuda


@pytest.mark.gpu
def test_alloc_export_import_in_one_process_is_byte_exact(cu):
    gran = cu.vmm_granularity(0)
    size = 3 * gran
    ptr = cu.vmm_alloc(0, size - 100)  # rounded up to the granularity
    try:
        assert cu.is_vmm(ptr)
        assert cu.is_vmm(ptr + size - 1)
        assert cu.mem_get_address_range(ptr + 12345) == (ptr, size)
        data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        _upload(cu, ptr, data)
        fd, base, got_size = cu.vmm_export_fd(ptr + 4096)  # any address inside the allocation
        assert (base, got_size) == (ptr, size)
        try:
            mapped = cu.vmm_import(fd, size, 0)
        finally:
            os.close(fd)
        try:
            assert mapped != ptr
            assert cu.is_vmm(mapped)
            np.testing.assert_array_equal(_download(cu, mapped, size), data)
            cu.memset(mapped + gran, 7, 100)  # one physical allocation behind both addresses
            np.testing.assert_array_equal(_download(cu, ptr + gran, 100), np.full(100, 7, np.uint8))
        finally:
            cu.vmm_unmap(mapped, size)
        np.testing.assert_array_equal(_download(cu, ptr, gran), data[:gran])  # still ours after the unmap
    finally:
        cu.vmm_free(ptr)


def _no_error_left(cu) -> None:
    """A kernel launch checks cudaGetLastError: it fails on an error a previous call left behind."""
    cu.spin(1000, 1, 0)
    cu.synchronize(0)


@pytest.mark.gpu
def test_plain_memory_is_not_vmm_and_failures_leave_no_sticky_error(cu):
    plain = cu.malloc(1 << 20)
    closed = cu.vmm_alloc(0, 1 << 20, exportable=False)
    try:
        assert not cu.is_vmm(plain)
        _no_error_left(cu)
        assert cu.is_vmm(closed)
        host = np.zeros(16, np.uint8)
        assert not cu.is_vmm(host.ctypes.data)
        _no_error_left(cu)
        with pytest.raises(RuntimeError, match=r"not a virtual-memory .* legacy CUDA IPC"):
            cu.vmm_export_fd(plain)
        _no_error_left(cu)
        with pytest.raises(RuntimeError, match=r"without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR .* exports_fd"):
            cu.vmm_export_fd(closed)
        _no_error_left(cu)
        r, w = os.pipe()  # a descriptor, but not of an exported allocation
        try:
            with pytest.raises(RuntimeError, match="cuMemImportFromShareableHandle failed: CUDA_ERROR"):
                cu.vmm_import(r, 1 << 21, 0)
        finally:
            os.close(r)
            os.close(w)
        _no_error_left(cu)
        with pytest.raises(ValueError, match="the pointer vmm_alloc returned"):
            cu.vmm_free(closed + 4096)
        _no_error_left(cu)
        cu.memset(plain, 1, 1 << 20)
        assert int(_download(cu, plain, 1 << 20).sum()) == 1 << 20
    finally:
        cu.vmm_free(closed)
        cu.free(plain)
