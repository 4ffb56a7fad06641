"""``llumnix-kv bench --transport shm``: argument parsing (no GPU needed) and a small host-memory run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llumnix_kv_transport_shm import bench

from llumnix_kv_core import native
from llumnix_kv_core.bench import KIB
from llumnix_kv_core.bench import MIB
from llumnix_kv_core.bench import rate_row

ROW_KEYS = set(rate_row("x", 16, 1, 16, 1.0, 1.0, 0.5))
HEADER = ["case", "block", "blocks", "MiB", "GB/s", "ceiling", "GB/s", "ratio", "goal", "met", "note"]


def test_gpu_cases_import_and_parse_without_a_gpu(tmp_path, capsys):
    from llumnix_kv_transport_shm.bench import gpu
    from llumnix_kv_transport_shm.bench import layerwise

    assert callable(gpu.run)
    assert callable(layerwise.run)
    args = bench.parser().parse_args(["--gpu", "--no-host", "--blocks", "64", "--repeat", "3",
                                      "--json", str(tmp_path / "g.json")])
    assert (args.gpu, args.no_host, args.blocks, args.repeat) == (True, True, 64, 3)
    assert (args.block_sizes, args.host_total_mib) == ("16384,65536,262144,2097152", 256)
    with pytest.raises(SystemExit) as info:
        bench.main(["--block-sizes", "16384,100"])
    assert info.value.code == 2
    assert "block sizes must be positive multiples of 16 bytes" in capsys.readouterr().err
    # no case selected: an empty table and a results file with only the head
    assert bench.main(["--no-host", "--json", str(tmp_path / "empty.json")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == HEADER
    assert json.loads((tmp_path / "empty.json").read_text()).keys() == {"started", "host", "python", "rows"}


@pytest.mark.skipif(not native.has("cma"), reason="the host bench's cma path needs the compiled core")
def test_host_bench_writes_the_table_and_json(tmp_path: Path):
    out = tmp_path / "results" / "cpu-shm.json"
    proc = subprocess.run([sys.executable, "-m", "llumnix_kv_core", "bench", "--transport", "shm", "--block-sizes",
                           "16384,65536", "--host-total-mib", "4", "--repeat", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)  # the installed package
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == HEADER
    assert [line.split()[:2] for line in lines[2:6]] == [["host-shm-cma", "16"], ["host-shm-cma", "64"],
                                                         ["host-shm-ring", "16"], ["host-shm-ring", "64"]]
    assert lines[-1] == f"results written to {out}"
    result = json.loads(out.read_text())
    assert result.keys() == {"started", "host", "python", "rows", "host_case"}
    assert result["host_case"] == {"cpus": result["host_case"]["cpus"], "native": native.implementation}
    rows = result["rows"]
    assert [(r["case"], r["block_bytes"], r["blocks"]) for r in rows] == [
        ("host-shm-cma", 16 * KIB, 256), ("host-shm-cma", 64 * KIB, 64),
        ("host-shm-ring", 16 * KIB, 256), ("host-shm-ring", 64 * KIB, 64)]
    for r in rows:
        assert r.keys() == ROW_KEYS
        assert r["bytes"] == 4 * MIB
        assert r["goal"] == 0.8
        assert r["gbps"] > 0
        assert r["ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
        assert r["met"] == (r["ratio"] >= 0.8)
