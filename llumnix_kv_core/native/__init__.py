"""Facade over the compiled core, with a pure-Python fallback.

Use this module, not ``llumnix_kv_core._native`` directly::

    from llumnix_kv_core import native

    native.copy_segments(src_addrs, dst_addrs, lengths)
    native.send_segments(sock, header, addrs, lengths, timeout_s=5.0)
    native.recv_segments(sock, addrs, lengths, timeout_s=5.0)
    digests = native.digest_segments(addrs, lengths)
    if native.has("cuda"):
        native.cuda().copy_segments(src, dst, lengths, stream)

Addresses and lengths are 1-D ``numpy.uint64`` arrays (lists and other
sequences are converted once with ``numpy.asarray``).

Which implementation runs is decided once, at import:

* ``LLUMNIX_KV_NATIVE=0`` forces the pure-Python fallback;
* otherwise ``llumnix_kv_core._native`` is imported; if it was not built (a
  ``LLUMNIX_KV_PURE_PYTHON=1`` install) the fallback is used and one
  ``RuntimeWarning`` says so; any other import error is raised.

``implementation`` is ``"native"`` or ``"fallback"``; ``fallback_reason`` says
why the fallback was chosen (``None`` for native).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from llumnix_kv_core.errors import NativeUnavailableError

__all__ = [
    "capabilities",
    "cma_copy",
    "copy_segments",
    "cuda",
    "digest_segments",
    "fallback_reason",
    "has",
    "implementation",
    "recv_segments",
    "send_segments",
]

_NATIVE_MODULE = "llumnix_kv_core._native"
_CUDA_MODULE = "llumnix_kv_core._native_cuda"
_ENV_NATIVE = "LLUMNIX_KV_NATIVE"
_REINSTALL_HINT = (
    "reinstall without LLUMNIX_KV_PURE_PYTHON (a C++17 compiler and CMake are needed), "
    "e.g. pip install --no-build-isolation ."
)


def _native_disabled() -> bool:
    return os.environ.get(_ENV_NATIVE, "").strip().lower() in ("0", "false", "no", "off")


def _resolve() -> tuple[ModuleType, str, str | None]:
    if _native_disabled():
        from llumnix_kv_core.native import _fallback

        return _fallback, "fallback", f"disabled by {_ENV_NATIVE}=0"
    try:
        module = importlib.import_module(_NATIVE_MODULE)
    except ModuleNotFoundError as e:
        if e.name != _NATIVE_MODULE:
            raise
        from llumnix_kv_core.native import _fallback

        reason = (
            f"{_NATIVE_MODULE} is not built (a LLUMNIX_KV_PURE_PYTHON=1 install, or a source "
            "checkout imported without installing)"
        )
        warnings.warn(
            f"{reason}: using the slower pure-Python fallback for copies and socket I/O; "
            f"to build it, {_REINSTALL_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
        return _fallback, "fallback", reason
    return module, "native", None


_impl, implementation, fallback_reason = _resolve()


def _u64(values: Any) -> Any:
    # Arrays go through untouched, so a wrong dtype surfaces as ValueError
    # instead of a silent cast; other sequences are converted once.
    if isinstance(values, np.ndarray):
        return values
    return np.asarray(values, dtype=np.uint64)


def copy_segments(src_addrs: Any, dst_addrs: Any, lengths: Any, num_threads: int = 0) -> None:
    """Copy ``lengths[i]`` bytes from ``src_addrs[i]`` to ``dst_addrs[i]`` for every i (host memory).

    Native: work split by bytes over a persistent thread pool (``num_threads=0``: one per
    core, capped); totals under 256 KiB run on the calling thread. Destinations must not
    overlap. Raises ValueError for mismatched, non-uint64 or null/wrapping segments.
    """
    _impl.copy_segments(_u64(src_addrs), _u64(dst_addrs), _u64(lengths), num_threads)


def digest_segments(addrs: Any, lengths: Any) -> np.ndarray:
    """XXH3-64 of each segment (``lengths[i]`` bytes at ``addrs[i]``, host memory): a numpy.uint64 array.

    Seed 0 and the default secret, as the xxHash specification defines XXH3-64; the compiled core
    (AVX2 where the CPU has it) and the NumPy fallback give identical digests. Raises ValueError for
    mismatched, non-uint64 or null/wrapping segments.
    """
    return _impl.digest_segments(_u64(addrs), _u64(lengths))


def send_segments(fd: Any, header: Any, addrs: Any, lengths: Any, timeout_s: float | None) -> int:
    """Write ``header`` (bytes-like or None), then every segment in order, to a stream socket.

    ``fd`` is an int or an object with ``fileno()``. ``timeout_s`` bounds each wait for
    progress (None: no limit). Returns the bytes written. Raises TimeoutError, ConnectionError
    (``BrokenPipeError``/``ConnectionResetError``: the peer closed), OSError, ValueError.
    """
    return _impl.send_segments(fd, header, _u64(addrs), _u64(lengths), timeout_s)


def recv_segments(fd: Any, addrs: Any, lengths: Any, timeout_s: float | None) -> int:
    """Read exactly ``sum(lengths)`` bytes from a stream socket into the segments, in order.

    Returns the bytes read. Raises TimeoutError (no progress for ``timeout_s``),
    ConnectionError (end of stream first; the message names received vs expected bytes),
    OSError, ValueError.
    """
    return _impl.recv_segments(fd, _u64(addrs), _u64(lengths), timeout_s)


def cma_copy(pid: int, write: bool, local_addrs: Any, remote_addrs: Any, lengths: Any, num_threads: int = 0) -> int:
    """Copy segments between this process and process ``pid`` of this host in one kernel copy.

    ``write=True`` copies ``local_addrs[i]`` here to ``remote_addrs[i]`` there. Linux cross-memory
    attach (``process_vm_writev``/``readv``), split by bytes over up to ``num_threads`` threads.
    Needs the compiled core (``has("cma")``); raises OSError (EPERM, ESRCH, EFAULT) from the kernel.
    """
    if "cma" not in _impl.capabilities():
        msg = f"cross-memory copies need the compiled core ({fallback_reason}); {_REINSTALL_HINT}"
        raise NativeUnavailableError(msg)
    return _impl.cma_copy(int(pid), bool(write), _u64(local_addrs), _u64(remote_addrs), _u64(lengths), num_threads)


# ---------------------------------------------------------------------- CUDA

_cuda_lock = threading.Lock()
_cuda_state: tuple[ModuleType | None, str | None] | None = None  # (module, error) once probed
_cuda_device_state: tuple[bool, str | None] | None = None  # (usable, error) once probed


def _load_cuda() -> tuple[ModuleType | None, str | None]:
    global _cuda_state
    with _cuda_lock:
        if _cuda_state is None:
            if _native_disabled():
                _cuda_state = (
                    None,
                    f"the compiled core is disabled by {_ENV_NATIVE}=0: unset it to use the CUDA module",
                )
            else:
                try:
                    _cuda_state = (importlib.import_module(_CUDA_MODULE), None)
                except ModuleNotFoundError as e:
                    if e.name != _CUDA_MODULE:
                        raise
                    _cuda_state = (
                        None,
                        f"{_CUDA_MODULE} is not built: this install was built without CUDA. Put nvcc "
                        "(CUDA toolkit 12.x/13.x) on PATH and reinstall with LLUMNIX_KV_CUDA=ON, e.g. "
                        "LLUMNIX_KV_CUDA=ON pip install --no-build-isolation .",
                    )
                except ImportError as e:
                    _cuda_state = (
                        None,
                        f"{_CUDA_MODULE} failed to load ({e}); reinstall llumnix-kv with LLUMNIX_KV_CUDA=ON",
                    )
        return _cuda_state


def _probe_device(module: ModuleType) -> tuple[bool, str | None]:
    global _cuda_device_state
    with _cuda_lock:
        if _cuda_device_state is None:
            try:
                count = module.device_count()
            except RuntimeError as e:
                _cuda_device_state = (False, str(e))  # names the CUDA error and the fix
            else:
                if count > 0:
                    _cuda_device_state = (True, None)
                else:
                    _cuda_device_state = (
                        False,
                        "no CUDA device is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES",
                    )
        return _cuda_device_state


def cuda(*, require_device: bool = True) -> ModuleType:
    """Return the ``llumnix_kv_core._native_cuda`` module.

    Raises NativeUnavailableError, naming the reason and the fix, when the module was not
    built or cannot load, or (with ``require_device=True``, the default) when there is no
    driver or no visible GPU.
    """
    module, error = _load_cuda()
    if module is None:
        raise NativeUnavailableError(error)
    if require_device:
        usable, device_error = _probe_device(module)
        if not usable:
            raise NativeUnavailableError(device_error)
    return module


_capabilities: frozenset[str] | None = None


def capabilities() -> frozenset[str]:
    """Features available here.

    ``cpu_copy``, ``socket_io`` and ``digest`` always; ``native`` and ``threaded_copy`` with the compiled
    core; ``cuda`` (plus the CUDA module's own, e.g. ``cuda_copy``, ``cuda_ipc``) when the CUDA
    module loads and sees at least one GPU. Probed once, then cached.
    """
    global _capabilities
    if _capabilities is None:
        features = set(_impl.capabilities())
        if implementation == "native":
            features.add("native")
        module, _ = _load_cuda()
        if module is not None and _probe_device(module)[0]:
            features.add("cuda")
            features.update(module.capabilities())
        _capabilities = frozenset(features)
    return _capabilities


def has(feature: str) -> bool:
    """True when ``feature`` is in :func:`capabilities`."""
    return feature in capabilities()
