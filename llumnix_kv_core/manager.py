"""Plugin manager: loads the ``llumnix_kv`` entry points with per-plugin failure isolation.

The registry is strict: a plugin module that implements a hook no spec declares (a misspelling),
defines a known hook without ``@hookimpl``, implements no known hook, uses a wrapper hookimpl,
or whose hook returns anything but an iterable of the kind's provider records, is recorded as
``failed`` with the reason, and only that plugin (or that hook's records) is left out.

Environment:
  ``LLUMNIX_KV_PLUGINS``          comma-separated allow-list of plugin names (entry-point names);
                                  when set, only these (plus built-ins) load.
  ``LLUMNIX_KV_DISABLE_PLUGINS``  comma-separated deny-list.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any
from typing import NamedTuple

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
from llumnix_kv_core.providers import PluginCommand
from llumnix_kv_core.providers import ScenarioPolicyProvider
from llumnix_kv_core.providers import TransportProvider

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = PROJECT
BUILTIN_PLUGINS = ("llumnix_kv_core.scenarios.pd",)


class PluginKind(NamedTuple):
    """How the registry collects one kind of provider."""

    hook: str  # the hook spec in hookspecs.py that returns the records
    provider: type  # the record type the hook returns: a frozen dataclass with name, is_available, commands


# A new kind of plugin is one entry here (plus its hook spec and provider record).
KINDS: dict[str, PluginKind] = {
    "transport": PluginKind("llumnix_kv_register_transports", TransportProvider),
    "layout": PluginKind("llumnix_kv_register_layouts", LayoutProvider),
    "engine": PluginKind("llumnix_kv_register_engines", EngineAdapterProvider),
    "scenario": PluginKind("llumnix_kv_register_scenarios", ScenarioPolicyProvider),
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
    reason: str = ""  # why it is not loaded
    summary: str = ""  # what a provider of this kind offers (transports: memory kinds, reach, device access)


class _HookResultError(Exception):
    """A hook returned something that is not an iterable of its kind's records."""


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _dist(ep: EntryPoint) -> tuple[str, str]:
    d = getattr(ep, "dist", None)
    return (d.metadata["Name"], d.version) if d is not None else ("?", "?")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or repr(exc)


def _known_hooks() -> str:
    return ", ".join(k.hook for k in KINDS.values())


def _record_problem(provider: Any) -> str | None:
    """What is wrong with a provider record's common fields, or None."""
    if not isinstance(provider.name, str) or not provider.name:
        return "name must be a non-empty string"
    commands = provider.commands
    if not isinstance(commands, tuple) or not all(isinstance(c, PluginCommand) for c in commands):
        return "commands must be a tuple of PluginCommand"
    names = [c.name for c in commands]
    if len(set(names)) != len(names):
        return f"two commands share a name ({', '.join(sorted(names))})"
    return None


class Registry:
    """Providers by kind plus the load record of every plugin. Build once, then use directly.

    ``providers[kind][name]`` holds every loaded provider of ``kind`` (a key of ``KINDS``),
    in load order; ``records`` holds one row per provider or failure.
    """

    def __init__(self) -> None:
        self.records: list[PluginRecord] = []
        self.providers: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)

    def provider(self, kind: str, name: str) -> Any:
        """The loaded provider ``name`` of ``kind``; UnknownPluginError saying why it is not there."""
        if kind not in self.providers:
            msg = f"unknown plugin kind {kind!r} (kinds: {', '.join(self.providers)})"
            raise UnknownPluginError(msg)
        table = self.providers[kind]
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
        return self.provider("transport", name)

    def scenario(self, name: str) -> ScenarioPolicyProvider:
        return self.provider("scenario", name)

    def engine(self, name: str) -> EngineAdapterProvider:
        return self.provider("engine", name)

    def parse_layout(self, desc: CacheGroupDescription) -> KVLayout:
        """The first layout parser, in load order, that accepts ``desc``; LayoutError naming all parsers otherwise."""
        parsers: dict[str, LayoutProvider] = self.providers["layout"]
        for p in parsers.values():
            out = p.parser.parse(desc)
            if out is not None:
                return out
        names = ", ".join(parsers) or "none loaded"
        msg = (
            f"no layout parser accepts cache group {desc.group_id} ({desc.engine} {desc.kind}, backend "
            f"{desc.backend}, layout {desc.layout}); parsers tried: {names}"
        )
        raise LayoutError(msg)

    # -- loading ---------------------------------------------------------------------------
    def _fail(self, plugin: str, kind: str, dist: tuple[str, str], reason: str) -> None:
        log.warning("llumnix-kv plugin %s failed: %s", plugin, reason)
        self.records.append(PluginRecord(plugin, kind, "", *dist, "failed", reason))

    def _hook_problem(self, module: ModuleType) -> str | None:
        """Why the hooks ``module`` implements cannot be used, or None (pluggy's check_pending, per plugin)."""
        unknown, wrappers, known = [], [], []
        for caller in self.pm.get_hookcallers(module) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is not module:
                    continue
                if impl.wrapper or impl.hookwrapper:
                    wrappers.append(caller.name)
                if caller.spec is not None:
                    known.append(caller.name)
                elif not impl.optionalhook:
                    unknown.append(caller.name)
        if unknown:
            return (f"implements {', '.join(unknown)}, which no hook spec declares (known hooks: {_known_hooks()}); "
                    "check the spelling")
        if wrappers:
            return (f"implements {', '.join(wrappers)} as a wrapper; registration hooks are called once per plugin, "
                    "so wrapper/hookwrapper hookimpls are not supported")
        unmarked = [k.hook for k in KINDS.values()
                    if k.hook not in known and inspect.isroutine(getattr(module, k.hook, None))]
        if unmarked:
            return f"defines {', '.join(unmarked)} without @llumnix_kv_core.hookimpl"
        if not known:
            return (f"implements no llumnix_kv hook (known hooks: {_known_hooks()}); mark each with "
                    "@llumnix_kv_core.hookimpl")
        return None

    def _records_of(self, hook: str, provider_type: type, result: Any) -> list[Any]:
        """The records a hook returned, checked before any is added."""
        if result is None or isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
            msg = (f"{hook} returned {type(result).__name__}, expected an iterable of {provider_type.__name__} "
                   "(a list; [] for none)")
            raise _HookResultError(msg)
        items = list(result)
        for item in items:
            if not isinstance(item, provider_type):
                msg = f"{hook} returned a {type(item).__name__} item, expected {provider_type.__name__}"
                raise _HookResultError(msg)
            problem = _record_problem(item)
            if problem:
                msg = f"{hook} returned {provider_type.__name__} {item.name!r}: {problem}"
                raise _HookResultError(msg)
        return items

    def _add(self, kind: str, provider: Any, plugin: str, dist: tuple[str, str]) -> None:
        try:
            avail = provider.is_available()
        except Exception as exc:  # a broken availability probe must not take others down
            avail = Availability(False, f"availability check raised {exc!r}")
        if provider.name in self.providers[kind]:
            self.records.append(PluginRecord(plugin, kind, provider.name, *dist, "failed",
                                             f"{kind} name {provider.name!r} is already registered by another plugin"))
            return
        status = "loaded" if avail.ok else "unavailable"
        summary = getattr(provider, "summary", None)
        self.records.append(PluginRecord(plugin, kind, provider.name, *dist, status, avail.reason,
                                         summary() if summary is not None else ""))
        if avail.ok:
            self.providers[kind][provider.name] = provider

    def register_module(self, module: ModuleType, plugin: str, dist: tuple[str, str], kind: str = "?") -> None:
        """Register one plugin module and collect its providers, isolating its failures.

        ``kind`` labels the records of a plugin that fails before any hook runs (the entry point's prefix).
        """
        try:
            self.pm.register(module, name=plugin)
        except Exception as exc:
            if self.pm.is_registered(module):  # pluggy before 1.7 may keep the hooks registered so far
                self.pm.unregister(module)
            self._fail(plugin, kind, dist, f"cannot register: {_one_line(exc)}")
            return
        problem = self._hook_problem(module)
        if problem:
            self.pm.unregister(module)
            self._fail(plugin, kind, dist, problem)
            return
        for hook_kind, (hook, provider_type) in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin is not module:
                    continue
                try:
                    providers = self._records_of(hook, provider_type, impl.function())
                except _HookResultError as exc:
                    self._fail(plugin, hook_kind, dist, str(exc))
                    continue
                except Exception as exc:
                    self._fail(plugin, hook_kind, dist, f"{hook} raised {exc!r}")
                    continue
                for provider in providers:
                    self._add(hook_kind, provider, plugin, dist)

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
            self.register_module(module, ep.name, dist, kind)


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
