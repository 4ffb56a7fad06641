"""Shared fixtures: the tiny model's directory; the PD engine tests' round of requests against a colocated engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# 128 is the CPU backend's block size: shorter than a block, exact multiples, several blocks, long.
PD_LENGTHS = (2, 5, 37, 127, 128, 129, 255, 256, 300, 384, 517, 640, 777, 1000, 1024, 1500, 2047, 2100, 64, 3000)
PD_MAX_TOKENS = 12


def _check_pd_round(cluster: Any, order: str, seed: int) -> None:
    """D's greedy output equals the colocated engine's token for token; every prompt token's KV came over
    the transport (D computed only the last token of each prompt itself); no block stays held after."""
    from llumnix_kv_engine_vllm.demo import make_prompts

    prompts = make_prompts(PD_LENGTHS, seed=seed)
    base = cluster.baseline.generate(prompts, max_tokens=PD_MAX_TOKENS)
    before = cluster.decode.call("stats")
    vllm_before = cluster.decode.metrics()
    run = cluster.run_p_then_d if order == "p-then-d" else cluster.run_concurrent
    p_out, d_out = run(prompts, PD_MAX_TOKENS)
    after = cluster.decode.call("stats")
    vllm_after = cluster.decode.metrics()

    assert all(len(p.token_ids) == 1 for p in p_out)
    for prompt, d, b in zip(prompts, d_out, base):
        assert d.token_ids == b.token_ids, f"prompt of {len(prompt)} tokens decoded differently"
        assert len(d.token_ids) == PD_MAX_TOKENS
    assert after["load"][0] - before["load"][0] == sum(len(p) for p in prompts)
    assert after["load"][1] - before["load"][1] == len(prompts)
    moved = after["transfer"]
    received = moved.bytes_received - before["transfer"].bytes_received
    assert moved.transfers_received - before["transfer"].transfers_received == len(prompts)
    assert received > 0

    def delta(metric: str) -> float:
        return vllm_after.get(metric, 0.0) - vllm_before.get(metric, 0.0)

    # vLLM's own counters agree: every prompt token came over the connector, from a peer (vLLM counts the
    # last one, which D computes again to sample from, as loaded too).
    loaded = sum(len(p) for p in prompts)
    assert delta("vllm:prompt_tokens_by_source{source=external_kv_transfer}") == loaded, vllm_after
    assert delta("vllm:prompt_tokens_cached_by_source{source=p2p}") == loaded, vllm_after
    # The connector's own numbers reach vLLM's /metrics: every byte and transfer D received.
    assert delta("vllm:llumnix_kv_bytes{direction=load}") == received
    assert delta("vllm:llumnix_kv_transfers{direction=load,outcome=done}") == len(prompts)
    assert delta("vllm:llumnix_kv_transfer_seconds{direction=load}_count") == len(prompts)

    held = cluster.drain()
    assert held["prefill"] == {"pending": False, "used_blocks": 0}
    assert held["decode"] == {"pending": False, "used_blocks": 0}


@pytest.fixture
def check_pd_round() -> Callable[[Any, str, int], None]:
    """``check_pd_round(cluster, order, seed)``: run one round (``p-then-d`` or ``concurrent``) and check it."""
    return _check_pd_round


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny Llama's ``config.json``."""
    from llumnix_kv_engine_vllm.harness import write_model

    return write_model(tmp_path_factory.mktemp("model") / "tiny-llama")
