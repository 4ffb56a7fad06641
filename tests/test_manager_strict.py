"""The registry is strict: a plugin whose hooks cannot be used fails, with the reason, and alone."""

from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
from registry_testkit import ep
from registry_testkit import only
from registry_testkit import records
from registry_testkit import transport_plugin

from llumnix_kv_core import manager
from llumnix_kv_core.errors import PluginError
from llumnix_kv_core.errors import UnknownPluginError
from llumnix_kv_core.manager import KINDS
from llumnix_kv_core.manager import PluginKind
from llumnix_kv_core.manager import Registry
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.providers import Availability
from llumnix_kv_core.providers import PluginCommand

ALL_HOOKS = ", ".join(k.hook for k in KINDS.values())


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLUMNIX_KV_PLUGINS", raising=False)
    monkeypatch.delenv("LLUMNIX_KV_DISABLE_PLUGINS", raising=False)


def module_with(body: str) -> str:
    """A plugin module: the marker and the transport records imported, then ``body``."""
    head = """
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import PluginCommand
        from llumnix_kv_core.providers import TransportProvider

        CALLS = []
    """
    return textwrap.dedent(head) + textwrap.dedent(body)


def test_bad_hooks_fail_their_plugin_only(plugin_modules):
    wrong_type = plugin_modules("wrongtype", """
        from llumnix_kv_core import hookimpl

        @hookimpl
        def llumnix_kv_register_transports():
            return ["not a provider"]
    """)
    raising = plugin_modules("raising", """
        from llumnix_kv_core import hookimpl

        @hookimpl
        def llumnix_kv_register_scenarios():
            raise ValueError("scenario hook broke")
    """)
    bad_signature = plugin_modules("badsig", """
        from llumnix_kv_core import hookimpl

        @hookimpl
        def llumnix_kv_register_transports(unexpected_argument):
            return []
    """)
    good = plugin_modules("good", transport_plugin("t_survivor"))
    reg = build_registry([ep("transport-wrongtype", wrong_type), ep("scenario-raising", raising),
                          ep("transport-badsig", bad_signature), ep("transport-good", good)])
    rec = only(reg, "transport-wrongtype")
    assert rec.status == "failed"
    assert "expected TransportProvider" in rec.reason
    rec = only(reg, "scenario-raising")
    assert (rec.kind, rec.status) == ("scenario", "failed")
    assert "llumnix_kv_register_scenarios" in rec.reason
    assert "scenario hook broke" in rec.reason
    rec = only(reg, "transport-badsig")
    assert (rec.kind, rec.status) == ("transport", "failed")
    assert "unexpected_argument" in rec.reason
    assert reg.transport("t_survivor").name == "t_survivor"
    assert reg.pm.get_plugin("transport-badsig") is None


def test_misspelled_hook_fails_the_plugin_and_names_the_known_hooks(plugin_modules):
    typo = plugin_modules("typo", module_with("""
        @hookimpl
        def llumnix_kv_register_transport():
            CALLS.append("transport")
            return [TransportProvider("t_typo", lambda c: None)]
    """))
    # one good hook does not save a plugin with a misspelled one: none of its hooks run
    half = plugin_modules("half", module_with("""
        @hookimpl
        def llumnix_kv_register_transports():
            CALLS.append("transports")
            return [TransportProvider("t_half", lambda c: None)]

        @hookimpl
        def llumnix_kv_register_layout():
            return []
    """))
    good = plugin_modules("good", transport_plugin("t_good"))
    reg = build_registry([ep("transport-typo", typo), ep("transport-half", half), ep("transport-good", good)])
    rec = only(reg, "transport-typo")
    assert (rec.kind, rec.name, rec.status) == ("transport", "", "failed")
    assert rec.reason == (f"implements llumnix_kv_register_transport, which no hook spec declares (known hooks: "
                          f"{ALL_HOOKS}); check the spelling")
    rec = only(reg, "transport-half")
    assert rec.status == "failed"
    assert "implements llumnix_kv_register_layout, which no hook spec declares" in rec.reason
    assert sys.modules[typo].CALLS == []
    assert sys.modules[half].CALLS == []
    for name in ("t_typo", "t_half"):
        with pytest.raises(UnknownPluginError, match=rf"unknown transport '{name}' \(loaded transports: t_good\)"):
            reg.transport(name)
    assert only(reg, "transport-good").status == "loaded"
    # the failed plugins are unregistered: pluggy's own check of the whole manager passes
    assert reg.pm.get_plugin("transport-typo") is None
    assert reg.pm.get_plugin("transport-half") is None
    reg.pm.check_pending()


@pytest.mark.parametrize(("body", "reason"), [
    ("""
        def llumnix_kv_register_transports():
            return [TransportProvider("t_unmarked", lambda c: None)]
     """, "defines llumnix_kv_register_transports without @llumnix_kv_core.hookimpl"),
    ("""
        def make(config):
            return None
     """, f"implements no llumnix_kv hook (known hooks: {ALL_HOOKS}); mark each with @llumnix_kv_core.hookimpl"),
    ("""
        @hookimpl(wrapper=True)
        def llumnix_kv_register_transports():
            return (yield)
     """, "implements llumnix_kv_register_transports as a wrapper; registration hooks are called once per plugin"),
    ("""
        @hookimpl(hookwrapper=True)
        def llumnix_kv_register_transports():
            yield
     """, "as a wrapper"),
    ("""
        @hookimpl(wrapper=True)
        def llumnix_kv_register_transports():
            return []
     """, "cannot register: Plugin 'transport-bad' for hook 'llumnix_kv_register_transports'"),
    ("""
        @hookimpl(wrapper=True, hookwrapper=True)
        def llumnix_kv_register_transports():
            yield
     """, "mutually exclusive"),
], ids=["unmarked", "no-hooks", "wrapper", "hookwrapper", "wrapper-not-generator", "both-wrappers"])
def test_unusable_hookimpls_fail_the_plugin(plugin_modules, body, reason):
    bad = plugin_modules("bad", module_with(body))
    good = plugin_modules("good", transport_plugin("t_good"))
    reg = build_registry([ep("transport-bad", bad), ep("transport-good", good)])
    rec = only(reg, "transport-bad")
    assert (rec.kind, rec.name, rec.status) == ("transport", "", "failed")
    assert reason in rec.reason
    assert reg.pm.get_plugin("transport-bad") is None
    assert list(reg.providers["transport"]) == ["t_good"]
    reg.pm.check_pending()


def test_optional_unknown_hook_is_ignored(plugin_modules):
    # optionalhook=True is pluggy's "this hook may have no spec" (a plugin also targeting a newer core)
    mod = plugin_modules("newer", module_with("""
        @hookimpl
        def llumnix_kv_register_transports():
            return [TransportProvider("t_newer", lambda c: None)]

        @hookimpl(optionalhook=True)
        def llumnix_kv_register_stores():
            CALLS.append("stores")
            return []
    """))
    reg = build_registry([ep("transport-newer", mod)])
    assert only(reg, "transport-newer").status == "loaded"
    assert reg.transport("t_newer").name == "t_newer"
    assert sys.modules[mod].CALLS == []


@pytest.mark.parametrize(("returns", "reason"), [
    ("42", "llumnix_kv_register_transports returned int, expected an iterable of TransportProvider (a list; [] for "
           "none)"),
    ("None", "llumnix_kv_register_transports returned NoneType, expected an iterable of TransportProvider"),
    ("'tcp'", "llumnix_kv_register_transports returned str, expected an iterable of TransportProvider"),
    ("TransportProvider('t_single', None)", "returned TransportProvider, expected an iterable of TransportProvider"),
    ("[TransportProvider('t_ok', None), {'name': 'x'}]", "returned a dict item, expected TransportProvider"),
    ("[TransportProvider('', None)]", "returned TransportProvider '': name must be a non-empty string"),
    ("[TransportProvider('t_list', None, commands=[PluginCommand('bench', 'h', 'm:f')])]",
     "returned TransportProvider 't_list': commands must be a tuple of PluginCommand"),
    ("[TransportProvider('t_str', None, commands=('m:f',))]", "commands must be a tuple of PluginCommand"),
    ("[TransportProvider('t_two', None, commands=(PluginCommand('bench', 'a', 'm:f'), PluginCommand('bench', 'b', "
     "'m:g')))]", "two commands share a name (bench, bench)"),
    ("[TransportProvider('t_cmd', None, commands=(PluginCommand('bench', 'h', 'no_function'),))]",
     "llumnix_kv_register_transports raised ValueError(\"command 'bench': entry 'no_function' is not "
     "'module:function'\")"),
], ids=["int", "none", "str", "single", "bad-item", "empty-name", "list-commands", "str-command", "dup-commands",
        "bad-entry"])
def test_hook_results_that_are_not_records_fail_the_hook(plugin_modules, returns, reason):
    bad = plugin_modules("bad", module_with(f"""
        @hookimpl
        def llumnix_kv_register_transports():
            return {returns}

        @hookimpl
        def llumnix_kv_register_layouts():
            return []
    """))
    good = plugin_modules("good", transport_plugin("t_good"))
    reg = build_registry([ep("transport-bad", bad), ep("transport-good", good)])
    rec = only(reg, "transport-bad")  # one failed hook; its other hook ran and returned no records
    assert (rec.kind, rec.name, rec.status) == ("transport", "", "failed")
    assert reason in rec.reason
    assert list(reg.providers["transport"]) == ["t_good"]  # nothing of a failed hook's result is kept


def test_generator_hook_is_an_iterable(plugin_modules):
    mod = plugin_modules("gen", module_with("""
        @hookimpl
        def llumnix_kv_register_transports():
            yield TransportProvider("t_gen1", lambda c: None)
            yield TransportProvider("t_gen2", lambda c: None)
    """))
    reg = build_registry([ep("transport-gen", mod)])
    assert [(r.name, r.status) for r in records(reg, "transport-gen")] == [("t_gen1", "loaded"), ("t_gen2", "loaded")]


def test_plugin_command_fields_and_run(plugin_modules):
    mod = plugin_modules("cmds", """
        def count(argv):
            return len(argv)

        def quiet(argv):
            return None
    """)
    assert PluginCommand("count", "h", f"{mod}:count").run(["a", "b", "c"]) == 3
    assert PluginCommand("quiet", "h", f"{mod}:quiet").run([]) == 0
    with pytest.raises(PluginError, match=rf"command 'gone' \({mod}:gone\) cannot be loaded: .*gone"):
        PluginCommand("gone", "h", f"{mod}:gone").run([])
    with pytest.raises(PluginError, match=r"cannot be loaded: No module named 'lkv_no_such_module_q7'"):
        PluginCommand("absent", "h", "lkv_no_such_module_q7:main").load()
    for name in ("", "Bench", "two words", "-x"):
        with pytest.raises(ValueError, match="lower-case letters, digits and '-'"):
            PluginCommand(name, "h", "m:f")
    with pytest.raises(TypeError, match="help must be a string"):
        PluginCommand("ok", None, "m:f")
    for entry in ("m", "m:", ":f", "m:f:g", "m.:f", "m:f()"):
        with pytest.raises(ValueError, match=r"is not 'module:function'"):
            PluginCommand("ok", "h", entry)


@dataclass(frozen=True)
class StoreProvider:
    name: str
    factory: Any
    is_available: Any = Availability.yes
    commands: tuple[PluginCommand, ...] = ()


def test_a_new_kind_is_one_table_entry(plugin_modules, monkeypatch):
    spec = plugin_modules("store_spec", """
        from llumnix_kv_core.markers import hookspec

        @hookspec
        def llumnix_kv_register_stores():
            "Register KV stores."
    """)
    store = plugin_modules("store", """
        from llumnix_kv_core import hookimpl
        from test_manager_strict import StoreProvider

        @hookimpl
        def llumnix_kv_register_stores():
            return [StoreProvider("mem", dict)]
    """)
    typo = plugin_modules("store_typo", """
        from llumnix_kv_core import hookimpl

        @hookimpl
        def llumnix_kv_register_store():
            return []
    """)
    monkeypatch.setattr(manager, "KINDS", {**KINDS, "store": PluginKind("llumnix_kv_register_stores", StoreProvider)})
    monkeypatch.setitem(sys.modules, "test_manager_strict", sys.modules[__name__])
    reg = Registry()
    reg.pm.add_hookspecs(importlib.import_module(spec))  # in the project: a spec in hookspecs.py
    for plugin, mod in (("store-mem", store), ("store-typo", typo)):
        reg.register_module(importlib.import_module(mod), plugin, ("?", "?"), "store")
    rec = only(reg, "store-mem")
    assert (rec.kind, rec.name, rec.status) == ("store", "mem", "loaded")
    assert reg.provider("store", "mem").factory is dict
    rec = only(reg, "store-typo")
    assert rec.status == "failed"
    assert "llumnix_kv_register_stores)" in rec.reason  # the new hook is among the known ones
    with pytest.raises(UnknownPluginError, match=r"unknown store 'disk' \(loaded stores: mem\)"):
        reg.provider("store", "disk")
    with pytest.raises(UnknownPluginError, match=r"unknown plugin kind 'cache' \(kinds: transport, layout, engine, "
                                                 r"scenario, store\)"):
        reg.provider("cache", "mem")
