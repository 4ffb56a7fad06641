"""Plugin manager: loads the ``llumnix_kv`` entry points with per-plugin failure isolation.

Environment:
  ``LLUMNIX_KV_PLUGINS``          comma-separated allow-list of plugin names (entry-point names);
                                  when set, only these (plus built-ins) load.
  ``LLUMNIX_KV_DISABLE_PLUGINS``  comma-separated deny-list.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from llumnix_kv_core import hookspecs
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.errors import UnknownPluginError
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.markers import PROJECT
from llumnix_kv_core.providers import Availability
from llumnix_kv_core.providers import EngineAdapterProvider
from llumnix_kv_core.providers import LayoutProvider
from llumnix_kv_core.providers import ScenarioPolicyProvider
from llumnix_kv_core.providers import TransportProvider

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = PROJECT
BUILTIN_PLUGINS = ("llumnix_kv_core.scenarios.pd",)

_KIND_HOOKS = {
    "transport": "llumnix_kv_register_transports",
    "layout": "llumnix_kv_register_layouts",
    "engine": "llumnix_kv_register_engines",
    "scenario": "llumnix_kv_register_scenarios",
}
_PROVIDER_TYPES = {
    "transport": TransportProvider,
    "layout": LayoutProvider,
    "engine": EngineAdapterProvider,
    "scenario": ScenarioPolicyProvider,
}


@dataclass(frozen=True)
class PluginRecord:
    """One row of ``llumnix-kv plugins``."""

    plugin: str  # entry-point name, or the module of a built-in
    kind: str
    name: str  # provider name ("" when the plugin failed before registering anything)
    distribution: str
    version: str
    status: str  # loaded | unavailable | failed | disabled
    reason: str = ""


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _dist(ep: EntryPoint) -> tuple[str, str]:
    d = getattr(ep, "dist", None)
    return (d.metadata["Name"], d.version) if d is not None else ("?", "?")


class Registry:
    """Providers by kind plus the load record of every plugin. Build once, then use directly."""

    def __init__(self) -> None:
        self.records: list[PluginRecord] = []
        self.transports: dict[str, TransportProvider] = {}
        self.layouts: list[LayoutProvider] = []
        self.engines: dict[str, EngineAdapterProvider] = {}
        self.scenarios: dict[str, ScenarioPolicyProvider] = {}
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)

    def _named(self, kind: str, name: str) -> Any:
        table: dict[str, Any] = {"transport": self.transports, "engine": self.engines, "scenario": self.scenarios}[kind]
        if name in table:
            return table[name]
        others = [r for r in self.records if r.kind == kind and r.name == name]
        if others:
            r = others[0]
            msg = f"{kind} {name!r} is {r.status}: {r.reason}"
            raise UnknownPluginError(msg)
        known = ", ".join(sorted(table)) or "none"
        msg = (
            f"unknown {kind} {name!r} (loaded {kind}s: {known}); check the spelling, or install the plugin "
            f"that provides it and confirm with `llumnix-kv plugins`"
        )
        raise UnknownPluginError(msg)

    def transport(self, name: str) -> TransportProvider:
        return self._named("transport", name)

    def scenario(self, name: str) -> ScenarioPolicyProvider:
        return self._named("scenario", name)

    def engine(self, name: str) -> EngineAdapterProvider:
        return self._named("engine", name)

    def parse_layout(self, desc: CacheGroupDescription) -> KVLayout:
        """The first layout parser that accepts ``desc``; LayoutError naming all parsers otherwise."""
        for p in self.layouts:
            out = p.parser.parse(desc)
            if out is not None:
                return out
        names = ", ".join(p.name for p in self.layouts) or "none loaded"
        msg = (
            f"no layout parser accepts cache group {desc.group_id} ({desc.engine} {desc.kind}, backend "
            f"{desc.backend}, layout {desc.layout}); parsers tried: {names}"
        )
        raise LayoutError(msg)

    # -- loading ---------------------------------------------------------------------------
    def _add(self, kind: str, provider: Any, plugin: str, dist: tuple[str, str]) -> None:
        if not isinstance(provider, _PROVIDER_TYPES[kind]):
            msg = f"returned {type(provider).__name__}, expected {_PROVIDER_TYPES[kind].__name__}"
            raise TypeError(msg)
        try:
            avail = provider.is_available()
        except Exception as exc:  # a broken availability probe must not take others down
            avail = Availability(False, f"availability check raised {exc!r}")
        taken = provider.name in self.transports if kind == "transport" else (
            provider.name in self.engines if kind == "engine" else provider.name in self.scenarios
            if kind == "scenario" else any(p.name == provider.name for p in self.layouts)
        )
        if taken:
            self.records.append(PluginRecord(plugin, kind, provider.name, *dist, "failed",
                                             f"{kind} name {provider.name!r} is already registered by another plugin"))
            return
        status = "loaded" if avail.ok else "unavailable"
        self.records.append(PluginRecord(plugin, kind, provider.name, *dist, status, avail.reason))
        if not avail.ok:
            return
        if kind == "transport":
            self.transports[provider.name] = provider
        elif kind == "layout":
            self.layouts.append(provider)
        elif kind == "engine":
            self.engines[provider.name] = provider
        else:
            self.scenarios[provider.name] = provider

    def register_module(self, module: ModuleType, plugin: str, dist: tuple[str, str]) -> None:
        """Register one plugin module and collect its providers, isolating its failures."""
        try:
            self.pm.register(module, name=plugin)
        except Exception as exc:
            self.records.append(PluginRecord(plugin, "?", "", *dist, "failed", f"cannot register: {exc!r}"))
            return
        for kind, hook in _KIND_HOOKS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != plugin:
                    continue
                try:
                    for provider in impl.function() or ():
                        self._add(kind, provider, plugin, dist)
                except Exception as exc:
                    log.warning("llumnix-kv plugin %s failed in %s: %r", plugin, hook, exc)
                    self.records.append(PluginRecord(plugin, kind, "", *dist, "failed", f"{hook} raised {exc!r}"))

    def load_entry_points(self, eps: Iterable[EntryPoint]) -> None:
        allow = _env_list("LLUMNIX_KV_PLUGINS")
        deny = _env_list("LLUMNIX_KV_DISABLE_PLUGINS") or set()
        for ep in eps:
            dist = _dist(ep)
            kind = ep.name.split("-", 1)[0] if "-" in ep.name else "?"
            if ep.name in deny or (allow is not None and ep.name not in allow):
                why = "LLUMNIX_KV_DISABLE_PLUGINS" if ep.name in deny else "not in LLUMNIX_KV_PLUGINS"
                self.records.append(PluginRecord(ep.name, kind, "", *dist, "disabled", why))
                continue
            try:
                module = ep.load()
            except ModuleNotFoundError as exc:
                own = ep.value.split(":")[0].split(".")[0]
                status = "failed" if exc.name and exc.name.split(".")[0] == own else "unavailable"
                self.records.append(PluginRecord(ep.name, kind, "", *dist, status,
                                                 f"import failed: {exc}; reinstall {dist[0]} with the extra "
                                                 "this plugin needs"))
                continue
            except Exception as exc:
                log.warning("llumnix-kv plugin %s failed to import: %r", ep.name, exc)
                self.records.append(PluginRecord(ep.name, kind, "", *dist, "failed", f"import raised {exc!r}"))
                continue
            self.register_module(module, ep.name, dist)


def build_registry(eps: Iterable[EntryPoint] | None = None) -> Registry:
    """A fresh registry: built-ins first, then every entry point of the ``llumnix_kv`` group."""
    reg = Registry()
    for modname in BUILTIN_PLUGINS:
        reg.register_module(importlib.import_module(modname), modname, ("llumnix-kv", _own_version()))
    reg.load_entry_points(entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps)
    return reg


def _own_version() -> str:
    from llumnix_kv_core import __version__

    return __version__


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_registry()
        return _registry
