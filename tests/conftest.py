"""Shared fixtures of the core tests: plugin modules on disk, TCP-backed transfer agents."""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.manager import Registry
from llumnix_kv_core.manager import build_registry

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
def make_agent(registry: Registry):
    """``make(layouts, signature, timeout_s=10.0, listen=False, tp=(rank, size)) -> KVAgent`` over tcp.

    Every agent is closed after the test, and no transport thread may outlive it.
    """
    made: list[KVAgent] = []

    def make(layouts, signature, *, timeout_s: float = 10.0, listen: bool = False, connections: int = 2,
             tp: tuple[int, int] = (0, 1)):
        cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, connections_per_peer=connections)
        agent = KVAgent(registry.transport("tcp").factory(cfg), list(layouts), dict(signature), timeout_s=timeout_s,
                        tp_rank=tp[0], tp_size=tp[1])
        made.append(agent)
        if listen:
            agent.listen("127.0.0.1", 0)
        return agent

    yield make
    for agent in made:
        agent.close()
    # A channel closed by its peer may still be finishing its on_closed callback: allow it a moment.
    for th in threading.enumerate():
        if th.name.startswith("lkv-tcp"):
            th.join(5.0)
    left = [th.name for th in threading.enumerate() if th.name.startswith("lkv-tcp")]
    assert not left, f"transport threads still running after close: {left}"
