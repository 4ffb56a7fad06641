"""Test kits for llumnix-kv and its plugins (importable by plugin tests and by spawned test processes).

* :mod:`~llumnix_kv_core.testing.layouts`: plan + copy between TP ranks, vLLM-built caches.
* :mod:`~llumnix_kv_core.testing.frames`: a recording frame handler, registered buffers,
  scattered segment plans, raw frames over sockets.
* :mod:`~llumnix_kv_core.testing.transport`: the transport conformance suite every transport
  plugin runs (``TransportConformance``).
* :mod:`~llumnix_kv_core.testing.loopback`: an in-process transport, so the core's own tests
  need no transport plugin.
* :mod:`~llumnix_kv_core.testing.agents`: toy KV caches and transfer agents over a given transport.
"""
