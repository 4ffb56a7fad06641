"""Hook specs: each documents a working example plugin, is called by the registry, and has a test here.

Every spec in ``hookspecs.py`` has an ``Example::`` that is run as a plugin module, a ``KINDS`` entry in
the registry, and a ``test_hook_<spec name>`` below.
"""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest
from registry_testkit import ep
from registry_testkit import only
from registry_testkit import transport_plugin

from llumnix_kv_core import hookspecs
from llumnix_kv_core.config import ConnectorConfig
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.manager import KINDS
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.markers import PROJECT
from llumnix_kv_core.providers import EngineAdapterProvider
from llumnix_kv_core.providers import LayoutProvider
from llumnix_kv_core.providers import TransportProvider

HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, f"{PROJECT}_spec"))
KIND_OF = {k.hook: kind for kind, k in KINDS.items()}


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLUMNIX_KV_PLUGINS", raising=False)
    monkeypatch.delenv("LLUMNIX_KV_DISABLE_PLUGINS", raising=False)


def example_of(hook: str) -> str:
    """The indented block after ``Example::`` in the spec's docstring, dedented."""
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert "Example::" in doc, f"hook spec {hook} has no Example:: block"
    lines = doc.split("Example::", 1)[1].split("\n")[1:]
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith(" ")), len(lines))
    return textwrap.dedent("\n".join(lines[:end])).strip() + "\n"


def test_every_hook_spec_is_a_registry_kind():
    assert HOOKS, "no hook specs found"
    assert sorted(KIND_OF) == HOOKS  # every spec is called by the registry, every kind has a spec


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_spec_has_a_test(hook):
    assert callable(globals().get(f"test_hook_{hook}")), f"hook {hook} has no test_hook_{hook} in this module"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_example_is_a_working_plugin(plugin_modules, hook):
    source = example_of(hook)
    assert "@hookimpl" in source
    assert f"def {hook}(" in source
    kind = KIND_OF[hook]
    mod = plugin_modules(f"example_{kind}", source)
    reg = build_registry([ep(f"{kind}-example", mod)])
    rec = only(reg, f"{kind}-example")
    assert (rec.kind, rec.status, rec.reason) == (kind, "loaded", "")
    provider = reg.provider(kind, rec.name)
    assert isinstance(provider, KINDS[kind].provider)
    reg.pm.check_pending()


def test_hook_llumnix_kv_register_transports(plugin_modules):
    """Hooks run once per registry; the records they return are then used without pluggy."""
    mod = plugin_modules("counted", transport_plugin("t_counted"))
    lay = plugin_modules("lay", """
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.layout import KVLayout
        from llumnix_kv_core.providers import LayoutProvider

        CALLS = []

        class Parser:
            name = "toy"
            def parse(self, desc):
                if desc.backend != "TOY":
                    return None
                return KVLayout("toy", desc.group_id, desc.kind, desc.block_size, (), {"parser": "toy"})

        @hookimpl
        def llumnix_kv_register_layouts():
            CALLS.append(1)
            return [LayoutProvider("toy", Parser())]
    """)
    reg = build_registry([ep("transport-counted", mod), ep("layout-toy", lay)])
    counted, layout_mod = sys.modules[mod], sys.modules[lay]
    assert counted.CALLS == [1]
    assert layout_mod.CALLS == [1]
    # From here on nothing goes through pluggy: take the plugin manager away entirely.
    reg.pm = None
    desc = CacheGroupDescription("toyengine", 3, "attention", "TOY", "X", 16, "f16", ())
    for _ in range(3):
        provider = reg.transport("t_counted")
        assert type(provider) is TransportProvider
        assert provider.factory(TransportConfig())[0] == "built"
        assert reg.parse_layout(desc).group_id == 3
    assert provider is reg.providers["transport"]["t_counted"]
    assert all(type(p) is LayoutProvider for p in reg.providers["layout"].values())
    assert counted.CALLS == [1]
    assert layout_mod.CALLS == [1]


def test_hook_llumnix_kv_register_layouts(plugin_modules):
    """The first parser in load order that accepts a description wins; a refusal names every parser."""
    src = """
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.layout import KVLayout
        from llumnix_kv_core.providers import LayoutProvider

        class Parser:
            name = {name!r}
            def parse(self, desc):
                if desc.backend != "SHARED":
                    return None
                return KVLayout({name!r}, desc.group_id, desc.kind, desc.block_size, (), {{}})

        @hookimpl
        def llumnix_kv_register_layouts():
            return [LayoutProvider({name!r}, Parser())]
    """
    one = plugin_modules("one", src.format(name="first_parser"))
    two = plugin_modules("two", src.format(name="second_parser"))
    reg = build_registry([ep("layout-one", one), ep("layout-two", two)])
    shared = CacheGroupDescription("vllm", 0, "attention", "SHARED", "LBNHC", 16, "f16", ())
    assert reg.parse_layout(shared).parser == "first_parser"
    other = CacheGroupDescription("vllm", 2, "mamba", "MAMBA2", "?", 16, "f16", ())
    with pytest.raises(LayoutError) as info:
        reg.parse_layout(other)
    msg = str(info.value)
    assert "cache group 2" in msg
    assert "MAMBA2" in msg
    assert "first_parser, second_parser" in msg


def test_hook_llumnix_kv_register_engines(plugin_modules):
    """An engine adapter's record: its entry is only a name, its commands run their module's function."""
    demo = plugin_modules("toy_demo", """
        RUNS = []

        def main(argv):
            RUNS.append(argv)
            return 7
    """)
    mod = plugin_modules("toy_engine", f"""
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import EngineAdapterProvider, PluginCommand

        @hookimpl
        def llumnix_kv_register_engines():
            return [EngineAdapterProvider("toy", engine="toyengine", versions=">=1", entry="lkv_nowhere_x3.c:Conn",
                                          commands=(PluginCommand("demo", "a toy demo", "{demo}:main"),))]
    """)
    reg = build_registry([ep("engine-toy", mod)])
    provider = reg.engine("toy")
    assert type(provider) is EngineAdapterProvider
    assert (provider.engine, provider.versions, provider.entry) == ("toyengine", ">=1", "lkv_nowhere_x3.c:Conn")
    assert "lkv_nowhere_x3" not in sys.modules  # the engine imports its connector, the registry never does
    assert demo not in sys.modules  # nor a command's module before the command runs
    (command,) = provider.commands
    assert (command.name, command.help) == ("demo", "a toy demo")
    assert command.run(["--requests", "3"]) == 7
    assert sys.modules[demo].RUNS == [["--requests", "3"]]


def test_hook_llumnix_kv_register_scenarios(registry, monkeypatch):
    """The built-in pd policy, as the registry hands it out."""
    from llumnix_kv_core.errors import FrameError
    from llumnix_kv_core.errors import LlumnixKVError
    from llumnix_kv_core.scenarios import pd

    policy = registry.scenario("pd").factory(ConnectorConfig.from_extra({"lease_s": 7}))
    assert policy.name == "pd"
    # prefill side
    assert pd.prefill_params() == {"do_remote_decode": True}
    plan = policy.save_plan(pd.prefill_params())
    assert len(plan.transfer_id) == 32
    assert plan.lease_s == 7.0
    assert policy.save_plan(pd.prefill_params()).transfer_id != plan.transfer_id
    tid = "ab" * 16
    assert policy.save_plan({**pd.prefill_params(tid), "lease_s": 1.5}) == pd.SavePlan(tid, 1.5)
    assert registry.scenario("pd").factory(ConnectorConfig()).save_plan(pd.prefill_params()).lease_s == 120.0
    # A request may shorten the lease, never lengthen it nor break it.
    for asked in (1e18, float("nan"), float("inf"), -1, 0, "x", None):
        assert policy.save_plan({**pd.prefill_params(tid), "lease_s": asked}).lease_s == 7.0
    for params in (None, {}, {"do_remote_decode": False}, pd.decode_params(tid, ["h:1"])):
        assert policy.save_plan(params) is None
    with pytest.raises(FrameError, match=r"not 32 hex digits"):
        policy.save_plan(pd.prefill_params("not-a-transfer-id"))
    # P's output goes unchanged to D
    monkeypatch.setattr(pd.time, "time", lambda: 1000.0)
    out = policy.output_params(plan, ["10.0.0.1:7000", "10.0.0.1:7001"], "engine-p")
    assert out == {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": plan.transfer_id,
                   "remote_addresses": ["10.0.0.1:7000", "10.0.0.1:7001"], "remote_engine_id": "engine-p",
                   "lease_expires_at": 1007.0}
    load = policy.load_plan(out)
    assert load == pd.LoadPlan(plan.transfer_id, ("10.0.0.1:7000", "10.0.0.1:7001"), "engine-p")
    assert policy.save_plan(out) is None
    # decode side
    for params in (None, {}, pd.prefill_params(tid)):
        assert policy.load_plan(params) is None
    for params in ({"do_remote_prefill": True, "remote_addresses": ["h:1"]},
                   {"do_remote_prefill": True, "transfer_id": tid, "remote_addresses": []}):
        with pytest.raises(LlumnixKVError, match=r"decode_params\(\)"):
            policy.load_plan(params)
    with pytest.raises(FrameError):
        policy.load_plan(pd.decode_params("12345", ["h:1"]))
