"""The engine signature both instances of a transfer compare at handshake, built from this vLLM's own config."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")


def test_engine_signature_of_the_tiny_model(tiny_model, tmp_path) -> None:
    import vllm
    from llumnix_kv_engine_vllm.describe import engine_signature
    from llumnix_kv_engine_vllm.harness import TINY_LLAMA
    from llumnix_kv_engine_vllm.harness import write_model
    from llumnix_kv_engine_vllm.scheduler_harness import make_vllm_config

    from llumnix_kv_core.layout import signature_hash

    groups = [{"kind": "attention"}]
    p = engine_signature(make_vllm_config(tiny_model, "kv_producer"), groups)
    assert {k: p[k] for k in ("engine", "vllm_version", "model", "dtype", "num_layers", "total_num_kv_heads",
                              "head_size", "pipeline_parallel_size", "groups")} == {
        "engine": "vllm", "vllm_version": vllm.__version__, "model": "LlamaForCausalLM", "dtype": "torch.bfloat16",
        "num_layers": 2, "total_num_kv_heads": 2, "head_size": 32, "pipeline_parallel_size": 1, "groups": groups}
    json.dumps(p)  # it travels in the handshake
    # The same model elsewhere, in the other role, signs the same; another configuration does not.
    copy = write_model(tmp_path / "copy")
    d = engine_signature(make_vllm_config(copy, "kv_consumer"), groups)
    assert signature_hash(d) == signature_hash(p)
    other = write_model(tmp_path / "other", {**TINY_LLAMA, "rope_theta": 500000.0})
    assert engine_signature(make_vllm_config(other, "kv_consumer"), groups)["model_config"] != p["model_config"]
