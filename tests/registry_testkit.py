"""Helpers of the registry tests: plugin sources, hand-made entry points, record lookups."""

from __future__ import annotations

from importlib.metadata import EntryPoint

from llumnix_kv_core.manager import ENTRY_POINT_GROUP
from llumnix_kv_core.manager import PluginRecord
from llumnix_kv_core.manager import Registry

TRANSPORT_PLUGIN = """
from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import TransportProvider

CALLS = []

def factory(config):
    return ("built", config)

@hookimpl
def llumnix_kv_register_transports():
    CALLS.append(1)
    return [TransportProvider({name!r}, factory, description={description!r})]
"""


def transport_plugin(name: str, description: str = "") -> str:
    """Source of a plugin module registering one transport ``name`` whose factory returns ("built", config)."""
    return TRANSPORT_PLUGIN.format(name=name, description=description)


def ep(name: str, module: str) -> EntryPoint:
    return EntryPoint(name=name, value=module, group=ENTRY_POINT_GROUP)


def records(reg: Registry, plugin: str) -> list[PluginRecord]:
    return [r for r in reg.records if r.plugin == plugin]


def only(reg: Registry, plugin: str) -> PluginRecord:
    found = records(reg, plugin)
    assert len(found) == 1, f"expected one record for {plugin}, got {found}"
    return found[0]
