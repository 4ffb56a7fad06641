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
            "CUDA IPC and one gather/scatter kernel per frame",
            memory_kinds=("cpu", "cuda"),
            remote=False,
            device_access=("legacy_ipc",),
            commands=(PluginCommand("bench", "host-memory rates between two processes; --gpu: GPU0 -> GPU1, "
                                    "GPU <-> pinned host, layer-wise", "llumnix_kv_transport_shm.bench:main"),),
        )
    ]
