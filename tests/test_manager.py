"""Plugin registry: entry-point loading, failure isolation, allow/deny lists, lookups."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

from llumnix_kv_core import __version__
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.errors import UnknownPluginError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.manager import ENTRY_POINT_GROUP
from llumnix_kv_core.manager import Registry
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.providers import LayoutProvider
from llumnix_kv_core.providers import TransportProvider

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
    return TRANSPORT_PLUGIN.format(name=name, description=description)


def ep(name: str, module: str) -> EntryPoint:
    return EntryPoint(name=name, value=module, group=ENTRY_POINT_GROUP)


def records(reg: Registry, plugin: str) -> list:
    return [r for r in reg.records if r.plugin == plugin]


def only(reg: Registry, plugin: str):
    found = records(reg, plugin)
    assert len(found) == 1, f"expected one record for {plugin}, got {found}"
    return found[0]


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLUMNIX_KV_PLUGINS", raising=False)
    monkeypatch.delenv("LLUMNIX_KV_DISABLE_PLUGINS", raising=False)


def test_good_plugin_registers(plugin_modules):
    mod = plugin_modules("good", transport_plugin("t_good", "a good one"))
    reg = build_registry([ep("transport-good", mod)])
    rec = only(reg, "transport-good")
    assert (rec.kind, rec.name, rec.status, rec.reason) == ("transport", "t_good", "loaded", "")
    assert (rec.distribution, rec.version) == ("?", "?")  # hand-made entry points have no distribution
    provider = reg.transport("t_good")
    assert isinstance(provider, TransportProvider)
    assert provider.description == "a good one"
    cfg = TransportConfig(connections_per_peer=3)
    assert provider.factory(cfg) == ("built", cfg)
    # the built-in scenario is always there, recorded under its module name
    pd = only(reg, "llumnix_kv_core.scenarios.pd")
    assert (pd.kind, pd.name, pd.status, pd.distribution) == ("scenario", "pd", "loaded", "llumnix-kv")
    assert reg.scenario("pd").name == "pd"


def test_import_error_is_isolated(plugin_modules):
    bad = plugin_modules("bad", "raise RuntimeError('boom at import time')\n")
    good = plugin_modules("good", transport_plugin("t_after_bad"))
    reg = build_registry([ep("transport-bad", bad), ep("transport-good", good)])
    rec = only(reg, "transport-bad")
    assert (rec.kind, rec.name, rec.status) == ("transport", "", "failed")
    assert "boom at import time" in rec.reason
    assert only(reg, "transport-good").status == "loaded"
    assert reg.transport("t_after_bad").name == "t_after_bad"


def test_missing_third_party_module_is_unavailable(plugin_modules):
    mod = plugin_modules("needs_dep", "import lkv_absent_dependency_zz9\n")
    good = plugin_modules("good", transport_plugin("t_ok"))
    reg = build_registry([ep("transport-needsdep", mod), ep("transport-good", good)])
    rec = only(reg, "transport-needsdep")
    assert rec.status == "unavailable"
    assert "lkv_absent_dependency_zz9" in rec.reason
    assert only(reg, "transport-good").status == "loaded"


def test_missing_own_module_is_failed_not_unavailable(plugin_modules):
    # The plugin's own package is there but the module the entry point names is not: a broken
    # install, not a missing optional dependency.
    pkg = plugin_modules("pkg", "", package=True)
    missing_top = pkg.replace("_pkg", "_nothere")
    reg = build_registry([ep("layout-sub", f"{pkg}.plugin"), ep("layout-top", missing_top)])
    for name, missing in (("layout-sub", f"{pkg}.plugin"), ("layout-top", missing_top)):
        rec = only(reg, name)
        assert (rec.kind, rec.status) == ("layout", "failed"), rec
        assert missing in rec.reason


def test_unavailable_provider(plugin_modules):
    mod = plugin_modules("gated", """
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import Availability, TransportProvider

        def _no():
            return Availability(False, "needs the frobnicator; pip install frob", "frob")

        def _raises():
            raise OSError("probe exploded")

        @hookimpl
        def llumnix_kv_register_transports():
            return [TransportProvider("gated", lambda c: None, is_available=_no),
                    TransportProvider("probe", lambda c: None, is_available=_raises),
                    TransportProvider("fine", lambda c: None)]
    """)
    reg = build_registry([ep("transport-gated", mod)])
    by_name = {r.name: r for r in records(reg, "transport-gated")}
    assert by_name["gated"].status == "unavailable"
    assert by_name["gated"].reason == "needs the frobnicator; pip install frob"
    assert by_name["probe"].status == "unavailable"
    assert "probe exploded" in by_name["probe"].reason
    assert by_name["fine"].status == "loaded"
    assert set(reg.transports) >= {"fine"}
    assert "gated" not in reg.transports
    with pytest.raises(UnknownPluginError, match=r"'gated' is unavailable: needs the frobnicator"):
        reg.transport("gated")


def test_duplicate_names_second_fails(plugin_modules):
    first = plugin_modules("first", transport_plugin("dup", "first"))
    second = plugin_modules("second", transport_plugin("dup", "second"))
    lay = """
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import LayoutProvider

        class P:
            name = "samelayout"
            def parse(self, desc):
                return None

        @hookimpl
        def llumnix_kv_register_layouts():
            return [LayoutProvider("samelayout", P())]
    """
    lay1, lay2 = plugin_modules("lay1", lay), plugin_modules("lay2", lay)
    reg = build_registry([ep("transport-first", first), ep("transport-second", second),
                          ep("layout-one", lay1), ep("layout-two", lay2)])
    assert only(reg, "transport-first").status == "loaded"
    rec = only(reg, "transport-second")
    assert (rec.name, rec.status) == ("dup", "failed")
    assert "already registered" in rec.reason
    assert reg.transport("dup").description == "first"
    assert only(reg, "layout-one").status == "loaded"
    assert only(reg, "layout-two").status == "failed"
    assert [p.name for p in reg.layouts].count("samelayout") == 1


def test_duplicate_of_first_party_name_fails(plugin_modules):
    # A third-party transport that reuses the name "tcp" must not replace the first-party one.
    from importlib.metadata import entry_points

    mod = plugin_modules("imposter", transport_plugin("tcp", "imposter"))
    first_party = list(entry_points(group=ENTRY_POINT_GROUP))
    reg = build_registry([*first_party, ep("transport-imposter", mod)])
    assert only(reg, "transport-tcp").status == "loaded"
    assert only(reg, "transport-imposter").status == "failed"
    assert reg.transport("tcp").description != "imposter"


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
    assert rec.status == "failed"
    assert "unexpected_argument" in rec.reason
    assert reg.transport("t_survivor").name == "t_survivor"


def test_disable_list(plugin_modules, monkeypatch):
    a = plugin_modules("a", transport_plugin("t_a"))
    b = plugin_modules("b", transport_plugin("t_b"))
    monkeypatch.setenv("LLUMNIX_KV_DISABLE_PLUGINS", " transport-b , something-else ")
    reg = build_registry([ep("transport-a", a), ep("transport-b", b)])
    assert only(reg, "transport-a").status == "loaded"
    rec = only(reg, "transport-b")
    assert (rec.kind, rec.status, rec.reason) == ("transport", "disabled", "LLUMNIX_KV_DISABLE_PLUGINS")
    assert b not in sys.modules, "a disabled plugin must not even be imported"
    with pytest.raises(UnknownPluginError):
        reg.transport("t_b")


def test_allow_list(plugin_modules, monkeypatch):
    a = plugin_modules("a", transport_plugin("t_a"))
    b = plugin_modules("b", transport_plugin("t_b"))
    c = plugin_modules("c", transport_plugin("t_c"))
    monkeypatch.setenv("LLUMNIX_KV_PLUGINS", "transport-a,transport-c")
    monkeypatch.setenv("LLUMNIX_KV_DISABLE_PLUGINS", "transport-c")  # the deny-list wins
    reg = build_registry([ep("transport-a", a), ep("transport-b", b), ep("transport-c", c)])
    assert only(reg, "transport-a").status == "loaded"
    rec_b, rec_c = only(reg, "transport-b"), only(reg, "transport-c")
    assert (rec_b.status, rec_b.reason) == ("disabled", "not in LLUMNIX_KV_PLUGINS")
    assert (rec_c.status, rec_c.reason) == ("disabled", "LLUMNIX_KV_DISABLE_PLUGINS")
    assert b not in sys.modules
    assert c not in sys.modules
    assert set(reg.transports) == {"t_a"}
    # built-ins are not entry points: the allow-list leaves them alone
    assert reg.scenario("pd").name == "pd"


def test_unknown_names_list_the_known_ones(plugin_modules):
    a = plugin_modules("a", transport_plugin("zeta"))
    b = plugin_modules("b", transport_plugin("alpha"))
    reg = build_registry([ep("transport-a", a), ep("transport-b", b)])
    with pytest.raises(UnknownPluginError) as info:
        reg.transport("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    assert "alpha, zeta" in msg
    assert "llumnix-kv plugins" in msg
    with pytest.raises(UnknownPluginError, match=r"unknown scenario 'nope' \(loaded scenarios: pd\)"):
        reg.scenario("nope")
    with pytest.raises(UnknownPluginError, match=r"unknown engine 'nope' \(loaded engines: none\)"):
        reg.engine("nope")


def test_hooks_called_once_and_providers_used_without_pluggy(plugin_modules):
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
    assert provider is reg.transports["t_counted"]
    assert all(type(p) is LayoutProvider for p in reg.layouts)
    assert counted.CALLS == [1]
    assert layout_mod.CALLS == [1]


def test_parse_layout_first_acceptor_wins_and_refusal_names_parsers(plugin_modules):
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


def test_installed_first_party_plugins(registry):
    status = {(r.kind, r.name): r for r in registry.records}
    for key in (("layout", "flash_attn"), ("layout", "cpu_attn"), ("transport", "tcp"), ("scenario", "pd")):
        assert status[key].status == "loaded", status[key]
        assert (status[key].distribution, status[key].version) == ("llumnix-kv", __version__)
    assert {p.name for p in registry.layouts} >= {"flash_attn", "cpu_attn"}
    assert ("engine", "vllm") in status


def test_get_registry_is_built_once():
    assert get_registry() is get_registry()


# -- the built-in scenario, as the registry hands it out --------------------------------------------

def test_pd_policy_from_the_registry(registry, monkeypatch):
    from llumnix_kv_core.config import ConnectorConfig
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
