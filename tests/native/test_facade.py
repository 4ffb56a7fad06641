"""How llumnix_kv_core.native picks its implementation, and what it reports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from llumnix_kv_core import native
from llumnix_kv_core.errors import NativeUnavailableError


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    # Run outside the source tree so that the installed package is imported, with the native
    # module enabled unless the test says otherwise (the suite may run under LLUMNIX_KV_NATIVE=0).
    full_env = {k: v for k, v in os.environ.items() if k != "LLUMNIX_KV_NATIVE"} | env
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
        )


# Makes importing one module fail the way a missing or broken build would.
_BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {name!r}:
            raise {exc}
        return None
sys.meta_path.insert(0, _Block())
"""


def test_public_api():
    assert native.implementation in ("native", "fallback")
    for name in ("copy_segments", "send_segments", "recv_segments", "has", "capabilities", "cuda"):
        assert callable(getattr(native, name))
    caps = native.capabilities()
    assert isinstance(caps, frozenset)
    assert {"cpu_copy", "socket_io"} <= caps
    assert native.has("cpu_copy")
    assert not native.has("no-such-feature")
    assert native.has("native") == (native.implementation == "native")


def test_env_forces_fallback():
    r = _run(
        """
        import warnings
        warnings.simplefilter("error")
        from llumnix_kv_core import native
        print(native.implementation, native.fallback_reason)
        print(sorted(native.capabilities()))
        try:
            native.cuda()
        except Exception as e:
            print(type(e).__name__, e)
        """,
        LLUMNIX_KV_NATIVE="0",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("fallback disabled by LLUMNIX_KV_NATIVE=0")
    assert lines[1] == "['cpu_copy', 'digest', 'socket_io']"
    assert lines[2].startswith("NativeUnavailableError")
    assert "LLUMNIX_KV_NATIVE" in lines[2]


def test_missing_native_module_falls_back_with_one_warning():
    blocker = _BLOCKER.format(
        name="llumnix_kv_core._native",
        exc="ModuleNotFoundError(\"No module named 'llumnix_kv_core._native'\", name=name)",
    )
    r = _run(
        blocker
        + """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from llumnix_kv_core import native
    import llumnix_kv_core.native
print(native.implementation)
print(len(caught), caught[0].category.__name__ if caught else "-")
print(caught[0].message if caught else "")
""",
        LLUMNIX_KV_NATIVE="1",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "fallback"
    assert lines[1] == "1 RuntimeWarning"
    assert "LLUMNIX_KV_PURE_PYTHON" in lines[2]


def test_other_import_errors_are_raised():
    blocker = _BLOCKER.format(name="llumnix_kv_core._native", exc='ImportError("undefined symbol: foo")')
    r = _run(blocker + "\nfrom llumnix_kv_core import native\n")
    assert r.returncode != 0
    assert "undefined symbol: foo" in r.stderr


def test_missing_dependency_of_native_is_not_swallowed():
    # A ModuleNotFoundError for some *other* module must propagate.
    blocker = _BLOCKER.format(
        name="llumnix_kv_core._native",
        exc="ModuleNotFoundError(\"No module named 'somedep'\", name='somedep')",
    )
    r = _run(blocker + "\nfrom llumnix_kv_core import native\n")
    assert r.returncode != 0
    assert "somedep" in r.stderr


def test_cuda_not_built_reports_fix():
    blocker = _BLOCKER.format(
        name="llumnix_kv_core._native_cuda",
        exc="ModuleNotFoundError(\"No module named 'llumnix_kv_core._native_cuda'\", name=name)",
    )
    r = _run(
        blocker
        + """
from llumnix_kv_core import native
from llumnix_kv_core.errors import NativeUnavailableError
try:
    native.cuda(require_device=False)
except NativeUnavailableError as e:
    print("raised", e)
print("cuda" in native.capabilities())
"""
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("raised")
    assert "LLUMNIX_KV_CUDA=ON" in lines[0]
    assert lines[1] == "False"


def test_cuda_entry_point_is_consistent():
    if native.has("cuda"):
        assert native.cuda().device_count() > 0
        assert native.has("cuda_copy")
    else:
        # The error names the reason and the fix.
        with pytest.raises(NativeUnavailableError, match=r"\S"):
            native.cuda()


def test_pure_python_import_of_fallback_module():
    from llumnix_kv_core.native import _fallback

    assert {"cpu_copy", "socket_io", "digest"} == set(_fallback.capabilities())


@pytest.mark.skipif(native.implementation != "native", reason="needs the compiled core (implementation is fallback)")
def test_native_module_metadata():
    import llumnix_kv_core
    from llumnix_kv_core import _native

    assert _native.__version__ == llumnix_kv_core.__version__
    assert {"cpu_copy", "socket_io", "threaded_copy"} <= set(_native.capabilities())
