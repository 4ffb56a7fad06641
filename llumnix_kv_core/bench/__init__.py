"""``llumnix-kv bench``: transfer rates of scattered KV blocks against ceilings measured in the same run.

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
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_BLOCKS = (16 * KIB, 64 * KIB, 256 * KIB, 2 * MIB)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["case", "block", "blocks", "MiB", "GB/s", "ceiling GB/s", "ratio", "goal", "met", "note"]
    cells = []
    for r in rows:
        goal = r.get("goal")
        cells.append([
            r["case"], _size(r["block_bytes"]) if r.get("block_bytes") else "-", str(r.get("blocks", "-")),
            f"{r['bytes'] / MIB:.0f}" if r.get("bytes") else "-",
            f"{r['gbps']:.1f}" if r.get("gbps") is not None else "-",
            f"{r['ceiling_gbps']:.1f}" if r.get("ceiling_gbps") is not None else "-",
            f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-",
            f">= {goal:.2f}" if isinstance(goal, float) else (goal or "-"),
            {True: "yes", False: "NO", None: "-"}[r.get("met")],
            r.get("note", ""),
        ])
    widths = [max(len(c[i]) for c in [cols, *cells]) for i in range(len(cols))]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*["-" * w for w in widths])] + [fmt.format(*c) for c in cells])


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n // KIB} KiB"


def rate_row(case: str, block: int, blocks: int, nbytes: int, seconds: float, ceiling_s: float | None,
             goal: float | None, note: str = "") -> dict[str, Any]:
    gbps = nbytes / seconds / 1e9
    ceiling = nbytes / ceiling_s / 1e9 if ceiling_s else None
    ratio = gbps / ceiling if ceiling else None
    return {"case": case, "block_bytes": block, "blocks": blocks, "bytes": nbytes, "seconds": seconds,
            "gbps": gbps, "ceiling_gbps": ceiling, "ratio": ratio, "goal": goal,
            "met": None if goal is None or ratio is None else ratio >= goal, "note": note}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llumnix-kv bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU cases (needs two GPUs and the CUDA core)")
    parser.add_argument("--no-host", action="store_true", help="skip the host-memory shm case")
    parser.add_argument("--blocks", type=int, default=8192, help="scattered blocks per GPU case (default 8192)")
    parser.add_argument("--block-sizes", default=",".join(str(b) for b in DEFAULT_BLOCKS),
                        help="block sizes in bytes, comma-separated")
    parser.add_argument("--host-total-mib", type=int, default=256,
                        help="bytes per host case (blocks = total / block size; default 256 MiB)")
    parser.add_argument("--repeat", type=int, default=10, help="timed repetitions (median reported)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.block_sizes.split(",") if x]
    if any(b <= 0 or b % 16 for b in sizes):
        parser.error("block sizes must be positive multiples of 16 bytes")
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                              "python": platform.python_version(), "rows": []}
    if not args.no_host:
        from llumnix_kv_core.bench import host

        result["host_case"] = host.environment()
        result["rows"] += host.run(sizes, args.host_total_mib * MIB, args.repeat)
    if args.gpu:
        from llumnix_kv_core.bench import gpu

        env, rows = gpu.run(sizes, args.blocks, args.repeat)
        result["gpu"] = env
        result["rows"] += rows
    print(table(result["rows"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
