"""Plugin registry: entry-point loading, failure isolation, allow/deny lists, lookups."""

from __future__ import annotations

import sys

import pytest
from registry_testkit import ep
from registry_testkit import only
from registry_testkit import records
from registry_testkit import transport_plugin

from llumnix_kv_core import __version__
from llumnix_kv_core.errors import UnknownPluginError
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import ENTRY_POINT_GROUP
from llumnix_kv_core.manager import KINDS
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.manager import get_registry
from llumnix_kv_core.providers import TransportProvider


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
    assert set(reg.providers["transport"]) >= {"fine"}
    assert "gated" not in reg.providers["transport"]
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
    assert list(reg.providers["layout"]) == ["samelayout"]
    assert type(reg.providers["layout"]["samelayout"].parser).__module__ == lay1  # the first one stays


def test_duplicate_of_first_party_name_fails(plugin_modules):
    # A third-party transport that reuses the name "tcp" must not replace the first-party one.
    from importlib.metadata import entry_points

    mod = plugin_modules("imposter", transport_plugin("tcp", "imposter"))
    first_party = list(entry_points(group=ENTRY_POINT_GROUP))
    reg = build_registry([*first_party, ep("transport-imposter", mod)])
    assert only(reg, "transport-tcp").status == "loaded"
    assert only(reg, "transport-imposter").status == "failed"
    assert reg.transport("tcp").description != "imposter"


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
    assert set(reg.providers["transport"]) == {"t_a"}
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


def test_installed_first_party_plugins(registry):
    status = {(r.kind, r.name): r for r in registry.records}
    for key in (("layout", "flash_attn"), ("layout", "cpu_attn"), ("transport", "tcp"), ("scenario", "pd")):
        assert status[key].status == "loaded", status[key]
        assert (status[key].distribution, status[key].version) == ("llumnix-kv", __version__)
    assert set(registry.providers["layout"]) >= {"flash_attn", "cpu_attn"}
    assert ("engine", "vllm") in status
    # every command a loaded provider contributes names a function that exists
    commands = {(kind, p.name, c.name): c for kind, table in registry.providers.items() for p in table.values()
                for c in p.commands}
    assert ("transport", "shm", "bench") in commands
    for command in commands.values():
        assert callable(command.load()), command


def test_providers_keep_load_order(plugin_modules):
    mods = [plugin_modules(n, transport_plugin(f"t_{n}")) for n in ("zz", "aa", "mm")]
    reg = build_registry([ep(f"transport-{m}", m) for m in mods])
    assert list(reg.providers["transport"]) == ["t_zz", "t_aa", "t_mm"]
    assert list(reg.providers) == list(KINDS)


def test_get_registry_is_built_once():
    assert get_registry() is get_registry()
