"""What registration hooks return: one frozen record per plugin-provided object.

Every record has a ``name`` (unique within its kind), an ``is_available`` probe and
``commands``: the :class:`PluginCommand` entries the provider adds to the ``llumnix-kv``
command line (``llumnix-kv demo`` runs an engine's ``demo``, ``llumnix-kv bench`` a
transport's ``bench``, ``llumnix-kv run KIND NAME COMMAND`` any of them).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llumnix_kv_core.errors import PluginError

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


_ENTRY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class PluginCommand:
    """A command line entry a provider contributes.

    ``entry`` is ``"module:function"``; the module is imported only when the command runs,
    so a plugin module stays light. ``function(argv: list[str]) -> int | None`` parses its
    own arguments (``argv`` excludes the command's name) and returns the exit status.
    """

    name: str
    help: str
    entry: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _COMMAND_NAME.match(self.name):
            msg = f"command name {self.name!r} must be lower-case letters, digits and '-'"
            raise ValueError(msg)
        if not isinstance(self.help, str):
            msg = f"command {self.name!r}: help must be a string"
            raise TypeError(msg)
        if not isinstance(self.entry, str) or not _ENTRY.match(self.entry):
            msg = f"command {self.name!r}: entry {self.entry!r} is not 'module:function'"
            raise ValueError(msg)

    def load(self) -> Callable[[list[str]], int | None]:
        module, func = self.entry.split(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            msg = f"command {self.name!r} ({self.entry}) cannot be loaded: {exc}"
            raise PluginError(msg) from exc

    def run(self, argv: Sequence[str]) -> int:
        return int(self.load()(list(argv)) or 0)


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
    commands: tuple[PluginCommand, ...] = ()

    def summary(self) -> str:
        """What ``llumnix-kv plugins`` shows of a loaded transport: the memory it moves and how."""
        reach = "other hosts" if self.remote else "this host only"
        access = f"; device memory of peers via {', '.join(self.device_access)}" if self.device_access else ""
        return f"moves {', '.join(self.memory_kinds)} memory; reaches {reach}{access}"


@dataclass(frozen=True)
class LayoutProvider:
    """A layout parser: turns an engine's own cache description into a KVLayout."""

    name: str
    parser: LayoutParser
    engines: tuple[str, ...] = ()
    description: str = ""
    is_available: Callable[[], Availability] = _always
    commands: tuple[PluginCommand, ...] = ()


@dataclass(frozen=True)
class EngineAdapterProvider:
    """The glue into one inference engine (its connector class, its version range)."""

    name: str
    engine: str
    versions: str
    entry: str  # "module:attr" of the engine-facing class, imported only by the engine
    description: str = ""
    is_available: Callable[[], Availability] = _always
    commands: tuple[PluginCommand, ...] = ()


@dataclass(frozen=True)
class ScenarioPolicyProvider:
    """A scenario (PD separation, KVStore, migration, ...): decides per request what moves where."""

    name: str
    factory: Callable[[ConnectorConfig], ScenarioPolicy]
    description: str = ""
    is_available: Callable[[], Availability] = _always
    commands: tuple[PluginCommand, ...] = ()
