"""Shared-memory transport of llumnix-kv: processes of one host, host memory and GPU memory.

Control frames travel over a loopback TCP connection; bulk data never does: host memory
moves through a pre-faulted shared-memory ring per channel and direction, GPU memory is
written by one gather/scatter kernel through CUDA IPC peer mappings. The implementation
lives in :mod:`llumnix_kv_transport_shm.transport`, imported only when the transport is built
(see :mod:`llumnix_kv_transport_shm.plugin`).
"""

__all__: list[str] = []
