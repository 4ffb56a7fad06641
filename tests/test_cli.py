"""``llumnix-kv plugins``: run as a real command in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llumnix_kv_core import __version__

FIRST_PARTY = {
    ("layout", "flash_attn"): "layout-flash_attn",
    ("layout", "cpu_attn"): "layout-cpu_attn",
    ("transport", "tcp"): "transport-tcp",
    ("scenario", "pd"): "llumnix_kv_core.scenarios.pd",
}
VLLM_HINT = "pip install 'llumnix-kv[vllm]'"


def run(args: list[str], *, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LLUMNIX_KV_PLUGINS", "LLUMNIX_KV_DISABLE_PLUGINS")}
    full.update(env or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "llumnix_kv_core", *args]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)


def as_json(proc: subprocess.CompletedProcess) -> dict[tuple[str, str], dict]:
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    fields = {"plugin", "kind", "name", "distribution", "version", "status", "reason", "summary"}
    assert all(set(r) == fields for r in rows)
    return {(r["kind"], r["name"] or r["plugin"]): r for r in rows}


def test_plugins_json_lists_first_party():
    rows = as_json(run(["plugins", "--json"]))
    # Transports say what memory they move, how far, and how peers reach device memory.
    assert rows[("transport", "shm")]["summary"] == ("moves cpu, cuda memory; reaches this host only; device "
                                                     "memory of peers via exports_fd")
    assert rows[("transport", "tcp")]["summary"] == "moves cpu memory; reaches other hosts"
    for key, plugin in FIRST_PARTY.items():
        row = rows[key]
        assert row["plugin"] == plugin
        assert row["status"] == "loaded", row
        assert (row["distribution"], row["version"]) == ("llumnix-kv", __version__)
    vllm = rows[("engine", "vllm")]
    assert vllm["plugin"] == "engine-vllm"
    if importlib.util.find_spec("vllm") is not None:
        assert vllm["status"] == "loaded", vllm
    else:
        assert vllm["status"] == "unavailable", vllm
        assert VLLM_HINT in vllm["reason"]


def test_plugins_json_without_vllm():
    # ``sys.modules["vllm"] = None`` is how Python spells "this module cannot be imported".
    code = ("import sys; sys.modules['vllm'] = None; from llumnix_kv_core.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    rows = as_json(run(["plugins", "--json"], code=code))
    vllm = rows[("engine", "vllm")]
    assert vllm["status"] == "unavailable"
    assert "vllm" in vllm["reason"]
    assert VLLM_HINT in vllm["reason"]
    for key in FIRST_PARTY:
        assert rows[key]["status"] == "loaded"


def test_plugins_table():
    proc = run(["plugins"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "plugin", "distribution", "status", "detail"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    for (kind, name), plugin in FIRST_PARTY.items():
        assert rows[(kind, name)][2:6] == [plugin, "llumnix-kv", __version__, "loaded"]
    assert rows[("engine", "vllm")][2] == "engine-vllm"


def test_console_script():
    script = shutil.which("llumnix-kv", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the llumnix-kv console script is not installed next to this interpreter")
    proc = subprocess.run([script, "plugins", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {(r["kind"], r["name"]) for r in json.loads(proc.stdout)} >= set(FIRST_PARTY)


@pytest.fixture
def broken_dist(tmp_path: Path) -> Path:
    """A directory holding an installed distribution whose plugin raises at import."""
    info = tmp_path / "lkv_broken_demo-2.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lkv-broken-demo\nVersion: 2.5\n")
    (info / "entry_points.txt").write_text("[llumnix_kv]\ntransport-broken = lkv_broken_demo_plugin\n")
    (tmp_path / "lkv_broken_demo_plugin.py").write_text(textwrap.dedent("""
        raise ImportError("this plugin is broken on purpose")
    """))
    return tmp_path


def test_strict_fails_on_a_failed_plugin(broken_dist: Path):
    env = {"PYTHONPATH": os.pathsep.join([str(broken_dist), os.environ.get("PYTHONPATH", "")])}
    lenient = run(["plugins", "--json"], env=env)
    rows = as_json(lenient)
    row = rows[("transport", "transport-broken")]
    assert (row["status"], row["distribution"], row["version"]) == ("failed", "lkv-broken-demo", "2.5")
    assert "broken on purpose" in row["reason"]
    assert rows[("transport", "tcp")]["status"] == "loaded"

    strict = run(["plugins", "--strict"], env=env)
    assert strict.returncode == 1
    assert "broken on purpose" in strict.stdout

    disabled = run(["plugins", "--strict", "--json"], env={**env, "LLUMNIX_KV_DISABLE_PLUGINS": "transport-broken"})
    assert disabled.returncode == 0, disabled.stderr
    assert as_json(disabled)[("transport", "transport-broken")]["status"] == "disabled"


def test_bad_arguments():
    proc = run(["plugins", "--no-such-flag"])
    assert proc.returncode == 2
    assert "--no-such-flag" in proc.stderr


# -- commands contributed by plugins: demo, bench, run ----------------------------------------------

@pytest.fixture
def command_dist(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh interpreter that sees an installed toy engine and toy transport with commands."""
    info = tmp_path / "lkv_cmd_toys-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lkv-cmd-toys\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[llumnix_kv]\nengine-toy = lkv_cmd_engine\n"
                                           "transport-toy = lkv_cmd_transport\n")
    (tmp_path / "lkv_cmd_main.py").write_text(textwrap.dedent("""
        import json

        def demo(argv):
            print(json.dumps({"command": "demo", "argv": argv}))
            return 3

        def bench(argv):
            print(json.dumps({"command": "bench", "argv": argv}))
            return 4
    """))
    (tmp_path / "lkv_cmd_engine.py").write_text(textwrap.dedent("""
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import EngineAdapterProvider, PluginCommand

        @hookimpl
        def llumnix_kv_register_engines():
            return [EngineAdapterProvider("toy", "toy", ">=1", "lkv_cmd_nowhere:Connector",
                                          commands=(PluginCommand("demo", "toy demo", "lkv_cmd_main:demo"),)),
                    EngineAdapterProvider("bare", "bare", ">=1", "lkv_cmd_nowhere:Connector")]
    """))
    (tmp_path / "lkv_cmd_transport.py").write_text(textwrap.dedent("""
        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import PluginCommand, TransportProvider

        @hookimpl
        def llumnix_kv_register_transports():
            return [TransportProvider("toy", lambda c: None,
                                      commands=(PluginCommand("bench", "toy bench", "lkv_cmd_main:bench"),))]
    """))
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def ran(proc: subprocess.CompletedProcess, code: int) -> dict:
    assert proc.returncode == code, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_demo_runs_the_engine_demo_command(command_dist):
    out = ran(run(["demo", "--engine", "toy", "--requests", "2", "--json", "rows.json"], env=command_dist), 3)
    assert out == {"command": "demo", "argv": ["--requests", "2", "--json", "rows.json"]}
    bare = run(["demo", "--engine", "bare"], env=command_dist)
    assert bare.returncode == 2
    assert "engine 'bare' has no 'demo' command (its commands: none)" in bare.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="with vLLM the demo would start engines")
def test_demo_without_vllm_says_what_to_install():
    proc = run(["demo", "--requests", "1"])
    assert proc.returncode == 2
    assert "engine 'vllm' is unavailable" in proc.stderr
    assert VLLM_HINT in proc.stderr


def test_bench_runs_the_transport_bench_command(command_dist):
    out = ran(run(["bench", "--transport", "toy", "--gpu", "--help"], env=command_dist), 4)
    assert out == {"command": "bench", "argv": ["--gpu", "--help"]}
    several = run(["bench", "--repeat", "1"], env=command_dist)
    assert several.returncode == 2
    assert re.search(r"several transports have a bench command \((shm, toy|toy, shm)\): pick one with --transport",
                     several.stderr), several.stderr
    no_bench = run(["bench", "--transport", "tcp"])
    assert no_bench.returncode == 2
    assert "transport 'tcp' has no 'bench' command (its commands: none)" in no_bench.stderr
    unknown = run(["bench", "--transport", "nope"])
    assert unknown.returncode == 2
    assert "unknown transport 'nope'" in unknown.stderr


def test_bench_without_transport_runs_the_one_bench():
    proc = run(["bench", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: llumnix-kv bench --transport shm")
    for flag in ("--gpu", "--no-host", "--blocks", "--block-sizes", "--host-total-mib", "--repeat", "--json"):
        assert flag in proc.stdout
    none = run(["bench"], env={"LLUMNIX_KV_DISABLE_PLUGINS": "transport-shm"})
    assert none.returncode == 2
    assert "no loaded transport has a bench command" in none.stderr


def test_run_any_provider_command(command_dist):
    out = ran(run(["run", "transport", "toy", "bench", "-h", "--x", "1"], env=command_dist), 4)
    assert out == {"command": "bench", "argv": ["-h", "--x", "1"]}
    assert ran(run(["run", "engine", "toy", "demo"], env=command_dist), 3)["argv"] == []
    for args, error in ((["run", "engine", "toy", "bench"], "engine 'toy' has no 'bench' command (its commands: demo)"),
                        (["run", "store", "toy", "gc"], "unknown plugin kind 'store'"),
                        (["run", "engine", "nope", "demo"], "unknown engine 'nope'")):
        proc = run(args, env=command_dist)
        assert proc.returncode == 2
        assert error in proc.stderr
