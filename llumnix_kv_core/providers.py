"""What registration hooks return: one frozen record per plugin-provided object."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from llumnix_kv_core.config import ConnectorConfig
    from llumnix_kv_core.interfaces.layout import LayoutParser
    from llumnix_kv_core.interfaces.policy import ScenarioPolicy
    from llumnix_kv_core.interfaces.transport import Transport
    from llumnix_kv_core.interfaces.transport import TransportConfig


@dataclass(frozen=True)
class Availability:
    """Whether a provider can work in this process, and if not, why and how to fix it."""

    ok: bool
    reason: str = ""
    extra: str | None = None  # the llumnix-kv extra that brings what is missing

    @classmethod
    def yes(cls) -> Availability:
        return cls(True)

    @classmethod
    def needs_modules(cls, *modules: str, extra: str | None = None) -> Availability:
        """Available iff every module can be found (without importing it)."""
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if not missing:
            return cls(True)
        fix = f"; install it with: pip install 'llumnix-kv[{extra}]'" if extra else ""
        return cls(False, f"module {', '.join(missing)} not installed{fix}", extra)


def _always() -> Availability:
    return Availability.yes()


@dataclass(frozen=True)
class TransportProvider:
    """A transport. ``factory(config)`` builds one transport object per engine process."""

    name: str
    factory: Callable[[TransportConfig], Transport]
    description: str = ""
    memory_kinds: tuple[str, ...] = ("cpu",)
    remote: bool = True  # can reach another host
    # How its peers reach device memory this process allocated: "legacy_ipc" (cudaIpc handles,
    # not valid on virtual-memory allocations), "exports_fd" (cuMem POSIX-fd handles), "registers"
    # (registered with an RDMA NIC). Engines that allocate KV differently per case read this.
    device_access: tuple[str, ...] = ()
    is_available: Callable[[], Availability] = _always


@dataclass(frozen=True)
class LayoutProvider:
    """A layout parser: turns an engine's own cache description into a KVLayout."""

    name: str
    parser: LayoutParser
    engines: tuple[str, ...] = ()
    description: str = ""
    is_available: Callable[[], Availability] = _always


@dataclass(frozen=True)
class EngineAdapterProvider:
    """The glue into one inference engine (its connector class, its version range)."""

    name: str
    engine: str
    versions: str
    entry: str  # "module:attr" of the engine-facing class, imported only by the engine
    description: str = ""
    is_available: Callable[[], Availability] = _always
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioPolicyProvider:
    """A scenario (PD separation, KVStore, migration, ...): decides per request what moves where."""

    name: str
    factory: Callable[[ConnectorConfig], ScenarioPolicy]
    description: str = ""
    is_available: Callable[[], Availability] = _always
