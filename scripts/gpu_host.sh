#!/usr/bin/env bash
# Build llumnix-kv on a GPU host without network access and run the GPU tests and benchmarks.
#
# Needs: python3 with torch (CUDA), numpy, pybind11 and scikit-build-core; nvcc and CMake; two GPUs
# for the transport tests and the GPU0 -> GPU1 benchmark. Wheels of missing pure-Python test tools
# (pytest, pluggy, iniconfig, packaging) may be placed in .whl/ next to this repository's files.
#
# Writes under $OUT (default ./gpu-out): devices.txt, build.log, pytest-gpu.log, bench.log and
# gpu-bench.json. Exit status: non-zero if the build, a GPU test or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

{ nvidia-smi -L; nvidia-smi topo -m; nvcc --version | tail -1; } > "$OUT/devices.txt" 2>&1
cat "$OUT/devices.txt"

if ! "$PY" -c "import pytest, pluggy" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/llumnix-kv-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/llumnix-kv-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "pytest/pluggy are missing and no wheels were given in .whl/" >&2
    exit 1
  fi
fi

t0=$(date +%s)
if ! LLUMNIX_KV_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "build failed (full log: $OUT/build.log)" >&2
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -c "from llumnix_kv_core import native; c = native.cuda(); print('devices:', c.device_count(), c.device_name(0))"

LLUMNIX_KV_REQUIRE=gpu timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider \
  tests/native tests/gpu plugins/transports/shm 2>&1 | tee "$OUT/pytest-gpu.log"
tests=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-240}" "$PY" -m llumnix_kv_core.cli bench --transport shm --gpu --no-host ${BENCH_ARGS:-} \
  --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

echo "pytest -m gpu exit status: $tests; bench exit status: $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
