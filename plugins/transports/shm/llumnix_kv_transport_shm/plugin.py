"""Plugin module of the shared-memory transport (entry point ``transport-shm``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llumnix_kv_core.markers import hookimpl
from llumnix_kv_core.providers import PluginCommand
from llumnix_kv_core.providers import TransportProvider

if TYPE_CHECKING:
    from llumnix_kv_core.interfaces.transport import Transport
    from llumnix_kv_core.interfaces.transport import TransportConfig


def _factory(config: TransportConfig) -> Transport:
    from llumnix_kv_transport_shm.transport import ShmTransport

    return ShmTransport(config)


@hookimpl
def llumnix_kv_register_transports() -> list[TransportProvider]:
    return [
        TransportProvider(
            "shm",
            _factory,
            description="processes of one host: host memory through a shared-memory ring, GPU memory through "
            "CUDA IPC (exported virtual-memory handles, or legacy handles for cudaMalloc memory) and one "
            "gather/scatter kernel per frame",
            memory_kinds=("cpu", "cuda"),
            remote=False,
            # Both paths work, but vLLM 0.34 refuses "legacy_ipc" together with "exports_fd" (legacy IPC
            # switches its extensible cache off, which "exports_fd" needs): declare what its cache needs.
            device_access=("exports_fd",),
            commands=(PluginCommand("bench", "host-memory rates between two processes; --gpu: GPU0 -> GPU1, "
                                    "GPU <-> pinned host, layer-wise", "llumnix_kv_transport_shm.bench:main"),),
        )
    ]
