"""Rates of scattered KV blocks through the shm transport, against ceilings measured in the same run.

Cases (each prints a table row and lands in the JSON):

* ``host-shm`` (any machine): the shm transport between two processes, host memory, scattered
  blocks, against a memcpy of the same bytes.
* ``--gpu`` (two GPUs): GPU0 -> GPU1 across processes through CUDA IPC (gather/scatter kernel and
  the copy engines' batched API) against a contiguous peer copy of the same bytes; the transport's
  own send path; GPU -> pinned host of scattered blocks against a contiguous pinned copy; and the
  layer-wise case (per-layer events, synthetic forward), whose exposed transfer time after the
  last layer is compared with one layer's transfer time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llumnix_kv_core.bench import DEFAULT_BLOCKS
from llumnix_kv_core.bench import MIB
from llumnix_kv_core.bench import block_sizes
from llumnix_kv_core.bench import new_result
from llumnix_kv_core.bench import report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llumnix-kv bench --transport shm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run the GPU cases (needs two GPUs and the CUDA core)")
    p.add_argument("--no-host", action="store_true", help="skip the host-memory shm case")
    p.add_argument("--blocks", type=int, default=8192, help="scattered blocks per GPU case (default 8192)")
    p.add_argument("--block-sizes", default=",".join(str(b) for b in DEFAULT_BLOCKS),
                   help="block sizes in bytes, comma-separated")
    p.add_argument("--host-total-mib", type=int, default=256,
                   help="bytes per host case (blocks = total / block size; default 256 MiB)")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        sizes = block_sizes(args.block_sizes)
    except ValueError as exc:
        cli.error(str(exc))
    result: dict[str, Any] = new_result()
    if not args.no_host:
        from llumnix_kv_transport_shm.bench import host

        result["host_case"] = host.environment()
        result["rows"] += host.run(sizes, args.host_total_mib * MIB, args.repeat)
    if args.gpu:
        from llumnix_kv_transport_shm.bench import gpu

        env, rows = gpu.run(sizes, args.blocks, args.repeat)
        result["gpu"] = env
        result["rows"] += rows
    report(result, args.json)
    return 0
