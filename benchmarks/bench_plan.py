"""Plan compiler benchmark: compile time and segments per request per layer (not a timed test).

A 32-layer model with vLLM attention pages (8 KV heads of 128, bf16, K|V fused, block 16),
requests of 1k / 8k / 32k tokens on scattered block ids, for:

* P == D (same layout, same TP): the goal is one segment per (block, tensor), fewer where
  block ids are consecutive on both sides;
* P TP 2 -> D TP 1 in LBNHC (token-major pages: a head slice is one segment per token) and
  in LBHNC (head-major: one segment per (block, source rank));
* NHD -> HND (permuted during the copy: one segment per (token, head)).

Per request the sender compiles one template per pair of geometries (cached) and one plan per
block range that all layers of that geometry share; both are timed, and the per-layer path
(a plan per layer, as if geometries differed) too. Goal: compile <= 1 ms per 1,000 blocks.

Usage: python benchmarks/bench_plan.py [--out benchmarks/results/plan.json]
(with the native module built; ``LLUMNIX_KV_NATIVE=0 ... --out benchmarks/results/plan-numpy.json``
measures the NumPy fallback).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import llumnix_kv_core.plan as plan_mod
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.plan import _compile_cached
from llumnix_kv_core.plan import compile_template
from llumnix_kv_core.plan import plan_tensor
from llumnix_kv_core.plan import tp_sources

LAYERS, HEADS, HEAD, BLOCK, ITEM = 32, 8, 128, 16, 2


def tensor(order: str, tp: int, num_blocks: int):
    h = HEADS // tp
    cb = 2 * HEAD * ITEM
    if order == "NHD":
        st = (BLOCK * h * cb, cb, h * cb, ITEM)
    else:
        st = (h * BLOCK * cb, BLOCK * cb, cb, ITEM)
    d = TensorDescription("layer", 1 << 40, (num_blocks, h, BLOCK, 2 * HEAD), st, ITEM)
    return tensor_layout_from_bhnc(d, Shard("H", (HEADS,)))


def one_case(name: str, src_order: str, dst_order: str, tp_p: int, tokens: int, rng, repeat: int):
    nblocks = -(-tokens // BLOCK)
    pool = 4 * nblocks + 64
    src = [tensor(src_order, tp_p, pool) for _ in range(tp_p)]
    dst = tensor(dst_order, 1, pool)
    # Scattered block ids, with short runs (what a busy allocator hands out).
    sb = rng.permutation(pool)[:nblocks]
    db = rng.permutation(pool)[:nblocks]
    sb[: nblocks // 2] = np.arange(nblocks // 2) + 3  # half of them one long run on both sides
    db[: nblocks // 2] = np.arange(nblocks // 2) + 7
    best_req = best_layer = best_tpl = float("inf")
    segments = 0
    for _ in range(repeat):
        _compile_cached.cache_clear()
        t0 = time.perf_counter()
        tpls = [compile_template(src[p], dst, p, tp_p, 0, 1) for p in tp_sources(0, 1, tp_p)]
        t1 = time.perf_counter()
        plans = [plan_tensor(t, src[p], sb, dst, db) for p, t in zip(tp_sources(0, 1, tp_p), tpls)]
        t2 = time.perf_counter()
        for _layer in range(LAYERS):  # the per-layer path: a plan per layer and source rank
            for p, t in zip(tp_sources(0, 1, tp_p), tpls):
                plan_tensor(t, src[p], sb, dst, db)
        t3 = time.perf_counter()
        best_tpl = min(best_tpl, t1 - t0)
        best_req = min(best_req, t2 - t0)
        best_layer = min(best_layer, (t3 - t2) / LAYERS)
        segments = sum(len(p.lengths) for p in plans)
    return {
        "case": name,
        "tokens": tokens,
        "blocks_per_layer": int(nblocks),
        "layers": LAYERS,
        "source_ranks": tp_p,
        "segments_per_layer": int(segments),
        "segments_per_block": round(segments / nblocks, 3),
        "segments_per_request": int(segments * LAYERS),
        "template_compile_ms": round(best_tpl * 1e3, 4),
        "request_compile_ms": round(best_req * 1e3, 4),
        "per_layer_plan_ms": round(best_layer * 1e3, 4),
        "per_layer_plan_ms_per_1000_blocks": round(best_layer * 1e3 * 1000 / nblocks, 4),
        "request_compile_ms_per_1000_blocks": round(best_req * 1e3 * 1000 / nblocks, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan.json")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [("P==D LBNHC", "NHD", "NHD", 1), ("P==D LBHNC", "HND", "HND", 1),
             ("P TP2 -> D TP1 LBNHC", "NHD", "NHD", 2), ("P TP2 -> D TP1 LBHNC", "HND", "HND", 2),
             ("NHD -> HND", "NHD", "HND", 1)]
    rows = [one_case(n, s, d, tp, tokens, rng, args.repeat) for n, s, d, tp in cases
            for tokens in (1024, 8192, 32768)]
    uname = platform.uname()
    out = {
        "benchmark": "plan compiler",
        "implementation": plan_mod.implementation,  # per-request stage: "native" (C++) or "numpy"
        "model": {"layers": LAYERS, "kv_heads": HEADS, "head_size": HEAD, "block_size": BLOCK, "dtype": "bf16"},
        "machine": {"system": uname.system, "release": uname.release, "machine": uname.machine,
                    "processor": platform.processor() or uname.machine, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    head = ("case", "tokens", "blocks", "seg/layer", "seg/block", "request ms", "per-layer ms", "ms/1k blocks")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) for x in (r["case"], r["tokens"], r["blocks_per_layer"], r["segments_per_layer"],
                                          r["segments_per_block"], r["request_compile_ms"], r["per_layer_plan_ms"],
                                          r["per_layer_plan_ms_per_1000_blocks"])))
    print(f"per-request stage: {plan_mod.implementation}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
