"""A third-party distribution adds a transport through the ``llumnix_kv`` entry-point group.

The test builds a real wheel of a throwaway distribution, installs it with pip into a
directory, and runs ``llumnix-kv plugins`` and a transfer in fresh interpreters that see it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

DIST = "llumnix-kv-countingtcp"
VERSION = "0.3.1"
WHEEL = f"llumnix_kv_countingtcp-{VERSION}-py3-none-any.whl"
INFO = f"llumnix_kv_countingtcp-{VERSION}.dist-info"

PACKAGE_INIT = '''
"""A transport that wraps the first-party tcp transport and counts the frames it receives."""

import threading

from llumnix_kv_core.interfaces.transport import FrameHandler, Transport
from llumnix_kv_core.manager import get_registry

COUNTS = {"data": 0, "data_bytes": 0, "control": 0}
_LOCK = threading.Lock()


class CountingHandler(FrameHandler):
    def __init__(self, inner):
        self.inner = inner

    def accept_data(self, transfer_id, layer, epoch):
        return self.inner.accept_data(transfer_id, layer, epoch)

    def on_data(self, channel, transfer_id, layer, nbytes, n_segments):
        with _LOCK:
            COUNTS["data"] += 1
            COUNTS["data_bytes"] += nbytes
        self.inner.on_data(channel, transfer_id, layer, nbytes, n_segments)

    def on_data_failed(self, channel, transfer_id, layer, error):
        self.inner.on_data_failed(channel, transfer_id, layer, error)

    def on_control(self, channel, kind, transfer_id, body):
        with _LOCK:
            COUNTS["control"] += 1
        self.inner.on_control(channel, kind, transfer_id, body)

    def on_closed(self, channel, error):
        self.inner.on_closed(channel, error)


class CountingTransport(Transport):
    name = "countingtcp"

    def __init__(self, config):
        super().__init__(config)
        self.inner = get_registry().transport("tcp").factory(config)

    def listen(self, host, port, handler, memory):
        return self.inner.listen(host, port, CountingHandler(handler), memory)

    def connect(self, address, handler, memory):
        return self.inner.connect(address, CountingHandler(handler), memory)

    def close(self):
        self.inner.close()
'''

PLUGIN = '''
from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import TransportProvider


def _factory(config):
    from lkv_countingtcp import CountingTransport

    return CountingTransport(config)


@hookimpl
def llumnix_kv_register_transports():
    return [TransportProvider("countingtcp", _factory, description="tcp, counting frames")]
'''

TRANSFER = '''
import json
import time

import numpy as np
from numpy.lib.stride_tricks import as_strided

import lkv_countingtcp
from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.interfaces.transport import TransportConfig
from llumnix_kv_core.layout import CacheGroupDescription, TensorDescription
from llumnix_kv_core.manager import build_registry
from llumnix_kv_core.wire import new_transfer_id

reg = build_registry()
provider = reg.transport("countingtcp")
L, B, H, N, C = 3, 16, 2, 4, 8  # C elements of 2 bytes
cb = 2 * C
per_layer = B * N * H * cb
strides = (N * H * cb, cb, H * cb)


def cache(seed):
    pool = np.random.default_rng(seed).integers(-128, 128, size=L * per_layer, dtype=np.int8)
    tensors = tuple(TensorDescription(f"layer.{i}", pool.ctypes.data + i * per_layer, (B, H, N, C), (*strides, 2), 2)
                    for i in range(L))
    desc = CacheGroupDescription("vllm", 0, "attention", "FLASH_ATTN", "LBNHC", N, "bfloat16", tensors)
    return pool, reg.parse_layout(desc)


def view(pool, i):
    return as_strided(pool[i * per_layer:], shape=(B, H, N, cb), strides=(*strides, 1))


p_pool, p_layout = cache(1)
d_pool, d_layout = cache(2)
sig = {"model": "toy", "groups": [dict(p_layout.signature)]}
cfg = TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0, connections_per_peer=2)
p = KVAgent(provider.factory(cfg), [p_layout], sig, timeout_s=10.0)
d = KVAgent(provider.factory(cfg), [d_layout], sig, timeout_s=10.0)
address = p.listen("127.0.0.1", 0)
tid = new_transfer_id()
pb, db = [1, 2, 3, 9], [15, 14, 0, 4]
expected = d_pool.copy()
for i in range(L):
    view(expected, i)[db] = view(p_pool, i)[pb]
p.sender.open(tid, {0: pb})
for i in range(L):
    p.sender.layer_ready(tid, f"layer.{i}", 0, len(pb))
p.sender.complete(tid, {0: len(pb)})
p.sender.seal(tid, True, 30.0)
d.receiver.start(tid, address, {0: db}, {0: 0})
deadline = time.monotonic() + 20
state = "timeout"
while time.monotonic() < deadline:
    done, failed = d.receiver.poll()
    if tid in done or tid in failed:
        state = "done" if tid in done else "failed: " + failed[tid]
        break
    time.sleep(0.01)
released = set()
while tid not in released and time.monotonic() < deadline:
    released |= p.sender.poll_released()
    time.sleep(0.01)
p.close()
d.close()
print(json.dumps({"state": state, "bytes_equal": bool(np.array_equal(d_pool, expected)),
                  "released": tid in released, "expected_bytes": L * len(pb) * H * N * cb,
                  "transport": type(p.transport).__module__, "counts": lkv_countingtcp.COUNTS}))
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(where: Path) -> Path:
    files = {
        "lkv_countingtcp/__init__.py": PACKAGE_INIT,
        "lkv_countingtcp/plugin.py": PLUGIN,
        f"{INFO}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n"
                            "Summary: counting tcp transport for llumnix-kv\nRequires-Dist: llumnix-kv\n",
        f"{INFO}/WHEEL": "Wheel-Version: 1.0\nGenerator: handmade\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{INFO}/entry_points.txt": "[llumnix_kv]\ntransport-countingtcp = lkv_countingtcp.plugin\n",
    }
    data = {name: textwrap.dedent(text).lstrip().encode() for name, text in files.items()}
    record = "\n".join([*(_record_line(n, b) for n, b in data.items()), f"{INFO}/RECORD,,"]) + "\n"
    wheel = where / WHEEL
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in data.items():
            zf.writestr(name, blob)
        zf.writestr(f"{INFO}/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, pip-installed into a target directory (not into this environment)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    root = tmp_path_factory.mktemp("third_party")
    wheel = build_wheel(root)
    target = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / INFO / "entry_points.txt").is_file()
    assert (target / "lkv_countingtcp" / "plugin.py").is_file()
    return target


def run_with(target: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LLUMNIX_KV_PLUGINS", "LLUMNIX_KV_DISABLE_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_wheel_is_well_formed(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as zf:
        names = set(zf.namelist())
        record = zf.read(f"{INFO}/RECORD").decode().splitlines()
        for line in record:
            name, digest, _size = line.split(",")
            assert name in names
            if digest:
                assert line == _record_line(name, zf.read(name))
    assert names == {line.split(",")[0] for line in record}


def test_plugins_lists_the_external_distribution(installed):
    proc = run_with(installed, ["-m", "llumnix_kv_core", "plugins", "--json", "--strict"])
    assert proc.returncode == 0, proc.stderr
    rows = {r["plugin"]: r for r in json.loads(proc.stdout)}
    row = rows["transport-countingtcp"]
    assert row == {"plugin": "transport-countingtcp", "kind": "transport", "name": "countingtcp",
                   "distribution": DIST, "version": VERSION, "status": "loaded", "reason": "",
                   "summary": "moves cpu memory; reaches other hosts"}
    assert rows["transport-tcp"]["status"] == "loaded"
    assert rows["transport-tcp"]["distribution"] == "llumnix-kv"


def test_plugin_is_invisible_without_the_install():
    proc = subprocess.run([sys.executable, "-m", "llumnix_kv_core", "plugins", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "countingtcp" not in proc.stdout


def test_transfer_through_the_external_transport(installed, tmp_path):
    script = tmp_path / "transfer.py"
    script.write_text(textwrap.dedent(TRANSFER))
    proc = run_with(installed, [str(script)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["transport"] == "lkv_countingtcp"
    assert out["state"] == "done"
    assert out["bytes_equal"]
    assert out["released"]
    counts = out["counts"]
    assert counts["data"] > 0
    assert counts["data_bytes"] == out["expected_bytes"]
    assert counts["control"] >= 4  # at least HELLO, HELLO_OK, PULL, DONE, ACK went through it
