"""What every transfer benchmark shares: rows against a ceiling measured in the same run, the table, the JSON.

The benchmarks themselves come with the plugins: a transport contributes a ``bench`` command
(``PluginCommand``), which ``llumnix-kv bench [--transport NAME]`` runs. They build on this
package: :func:`rate_row` and :func:`report` here, the copy ceilings and CUDA timing in
:mod:`.timing`, a frame-counting handler in :mod:`.frames`, and the transport-free GPU <-> pinned
host cases in :mod:`.offload`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_BLOCKS = (16 * KIB, 64 * KIB, 256 * KIB, 2 * MIB)
WAIT_S = 120.0  # longest wait for a benchmark peer


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


def from_child(q: Any, what: str) -> Any:
    """The next message ``(tag, ...)`` a benchmark child process put on ``q``; RuntimeError if it is an error.

    Children report a failure as ``("error", traceback_text)``.
    """
    msg = q.get(timeout=WAIT_S)
    if msg[0] == "error":
        raise RuntimeError(f"benchmark child failed during {what}: {msg[1]}")
    return msg


def block_sizes(text: str) -> list[int]:
    """Comma-separated block sizes in bytes; ValueError unless each is a positive multiple of 16."""
    sizes = [int(x) for x in text.split(",") if x]
    if not sizes or any(b <= 0 or b % 16 for b in sizes):
        msg = "block sizes must be positive multiples of 16 bytes"
        raise ValueError(msg)
    return sizes


def new_result() -> dict[str, Any]:
    """The head of a results file: when, where, which Python; cases append to ``rows``."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "python": platform.python_version(), "rows": []}


def report(result: dict[str, Any], json_path: Path | None) -> None:
    """Print the rows as a table and, with ``json_path``, write the whole result there."""
    print(table(result["rows"]))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {json_path}")
