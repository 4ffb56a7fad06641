"""``llumnix-kv plugins``: run as a real command in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
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
    assert all(set(r) == {"plugin", "kind", "name", "distribution", "version", "status", "reason"} for r in rows)
    return {(r["kind"], r["name"] or r["plugin"]): r for r in rows}


def test_plugins_json_lists_first_party():
    rows = as_json(run(["plugins", "--json"]))
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
