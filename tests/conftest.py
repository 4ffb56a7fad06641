"""Shared fixtures of the core tests: plugin modules on disk, transfer agents over the in-process loopback."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from llumnix_kv_core.manager import Registry
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.testing.agents import agents
from llumnix_kv_core.testing.loopback import LoopbackTransport

# registry_testkit is imported by name from the test modules.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def plugin_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``write(name, source, package=False) -> module name``: a uniquely named module under tmp_path.

    The directory is on sys.path for the test; the modules are dropped from sys.modules after it.
    """
    root = tmp_path / "plugin_modules"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    prefix = f"lkvt_{uuid.uuid4().hex[:8]}_"
    written: list[str] = []

    def write(name: str, source: str = "", *, package: bool = False) -> str:
        mod = prefix + name
        if package:
            (root / mod).mkdir()
            (root / mod / "__init__.py").write_text(textwrap.dedent(source))
        else:
            (root / f"{mod}.py").write_text(textwrap.dedent(source))
        written.append(mod)
        importlib.invalidate_caches()
        return mod

    yield write
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in written):
            del sys.modules[name]


@pytest.fixture(scope="session")
def registry() -> Registry:
    """A registry built from the installed entry points (first-party plugins)."""
    return build_registry()


@pytest.fixture
def make_agent():
    """``make(layouts, signature, timeout_s=10.0, listen=False, connections=2, tp=(rank, size)) -> KVAgent``
    over the loopback transport (see :func:`llumnix_kv_core.testing.agents.agents`)."""
    with agents(LoopbackTransport, "lkv-loopback") as make:
        yield make
