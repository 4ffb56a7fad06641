"""``llumnix-kv demo``: prefill/decode separation on real vLLM engines vs a colocated engine.

Starts three vLLM engines in separate processes (P producer, D consumer, and a
colocated baseline; tiny dummy-weight Llama on the CPU), pushes KV from P to D
over the chosen transport, and prints whether D's greedy tokens equal the
baseline's, the KV bytes moved, the transfer rate and TTFT.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llumnix_kv_core.scenarios.pd import decode_params
from llumnix_kv_core.scenarios.pd import prefill_params
from llumnix_kv_core.wire import new_transfer_id
from llumnix_kv_engine_vllm.harness import Completion
from llumnix_kv_engine_vllm.harness import EngineProcess
from llumnix_kv_engine_vllm.harness import kv_config
from llumnix_kv_engine_vllm.harness import write_model

# Lengths around the CPU backend's 128-token block: shorter than a block, exact multiples, several, long.
DEFAULT_LENGTHS = (1, 5, 37, 127, 128, 129, 255, 256, 300, 384, 517, 640, 777, 1000, 1024, 1500, 2047, 2100,
                   64, 200, 450, 900, 1300, 3000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(lengths: tuple[int, ...], seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@dataclass
class PDCluster:
    """A P engine, a D engine and a colocated baseline on one host."""

    prefill: EngineProcess
    decode: EngineProcess
    baseline: EngineProcess
    prefill_address: str

    @classmethod
    def start(cls, model: Path, transport: str = "tcp", **extra: Any) -> PDCluster:
        port = free_port()
        p = EngineProcess("prefill", model, kv_config("kv_producer", transport=transport, port=port, **extra))
        d = EngineProcess("decode", model, kv_config("kv_consumer", transport=transport, **extra))
        b = EngineProcess("colocated", model, None)
        for e in (p, d, b):
            e.wait_ready()
        return cls(p, d, b, f"127.0.0.1:{port}")

    def run_p_then_d(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[Completion], list[Completion]]:
        p_out = self.prefill.generate(prompts, [prefill_params() for _ in prompts], max_tokens=1)
        d_out = self.decode.generate(prompts, [o.kv_transfer_params for o in p_out], max_tokens=max_tokens)
        return p_out, d_out

    def run_concurrent(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[Completion], list[Completion]]:
        tids = [new_transfer_id() for _ in prompts]
        self.decode.start_generate(prompts, [decode_params(t, [self.prefill_address]) for t in tids], max_tokens)
        self.prefill.start_generate(prompts, [prefill_params(t) for t in tids], 1)
        return self.prefill.result(), self.decode.result()

    def drain(self) -> dict[str, dict[str, Any]]:
        return {"prefill": self.prefill.call("drain", 30.0), "decode": self.decode.call("drain", 30.0)}

    def close(self) -> None:
        for e in (self.prefill, self.decode, self.baseline):
            e.close()


def summarize(order: str, prompts: list[list[int]], p_out: list[Completion], d_out: list[Completion],
              base: list[Completion], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    same = [d.token_ids == b.token_ids for d, b in zip(d_out, base)]
    bytes_moved = after["transfer"].bytes_received - before["transfer"].bytes_received
    seconds = after["transfer"].receive_seconds - before["transfer"].receive_seconds
    return {
        "order": order,
        "requests": len(prompts),
        "identical": sum(same),
        "prompt_tokens": sum(len(p) for p in prompts),
        "loaded_tokens": after["load"][0] - before["load"][0],
        "decode_prefill_tokens": after["load"][1] - before["load"][1],
        "kv_bytes": bytes_moved,
        "transfer_gbps": bytes_moved / seconds / 1e9 if seconds > 0 else 0.0,
        "ttft_pd_ms": 1e3 * statistics.mean(p.ttft_s + d.ttft_s for p, d in zip(p_out, d_out)),
        "ttft_colocated_ms": 1e3 * statistics.mean(b.ttft_s for b in base),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = (DEFAULT_LENGTHS * (args.requests // len(DEFAULT_LENGTHS) + 1))[: args.requests]
    orders = ["p-then-d", "concurrent"] if args.order == "both" else [args.order]
    # Fresh prompts per dispatch order, so D's own prefix cache cannot serve a later run.
    prompt_sets = {order: make_prompts(lengths, seed=i) for i, order in enumerate(orders)}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "tiny-llama")
        cluster = PDCluster.start(model, args.transport)
        try:
            rows = []
            for order in orders:
                prompts = prompt_sets[order]
                base = cluster.baseline.generate(prompts, max_tokens=args.max_tokens)
                before = cluster.decode.call("stats")
                runner = cluster.run_p_then_d if order == "p-then-d" else cluster.run_concurrent
                p_out, d_out = runner(prompts, args.max_tokens)
                after = cluster.decode.call("stats")
                rows.append(summarize(order, prompts, p_out, d_out, base, before, after))
            blocks = cluster.drain()
            for r in rows:
                r["blocks_held_after"] = blocks["prefill"]["used_blocks"] + blocks["decode"]["used_blocks"]
            return rows
        finally:
            cluster.close()


def print_table(rows: list[dict[str, Any]], transport: str) -> None:
    print(f"\nllumnix-kv PD demo: vLLM (CPU) tiny Llama, transport {transport}, loopback\n")
    head = ("dispatch", "requests", "identical tokens", "prompt tokens loaded/computed on D", "KV bytes moved",
            "transfer GB/s", "TTFT PD ms", "TTFT colocated ms", "blocks held after")
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for r in rows:
        ident = f"yes ({r['identical']}/{r['requests']})" if r["identical"] == r["requests"] else \
            f"NO ({r['identical']}/{r['requests']})"
        print(" | ".join([r["order"], str(r["requests"]), ident,
                          f"{r['loaded_tokens']}/{r['decode_prefill_tokens']}", f"{r['kv_bytes']:,}",
                          f"{r['transfer_gbps']:.3f}",
                          f"{r['ttft_pd_ms']:.1f}", f"{r['ttft_colocated_ms']:.1f}", str(r["blocks_held_after"])]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llumnix-kv demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--order", choices=["both", "p-then-d", "concurrent"], default="both")
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args)
    print_table(rows, args.transport)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ok = all(r["identical"] == r["requests"] and r["blocks_held_after"] == 0 and r["kv_bytes"] > 0 for r in rows)
    return 0 if ok else 1
