"""Test kits for llumnix-kv and its plugins (importable by plugin tests and spawned test processes).

* :mod:`~llumnix_kv_core.testing.layouts`: plan + copy between TP ranks, vLLM-built caches.
* :mod:`~llumnix_kv_core.testing.frames`: a recording frame handler, registered buffers,
  scattered segment plans, raw frames over sockets.
"""
