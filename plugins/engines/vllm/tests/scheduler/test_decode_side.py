"""Decode instance (D, kv_consumer): vLLM's own Scheduler with our connector, no model run.

D's request carries the params P returned: vLLM asks the connector how many tokens to load
(the prompt less D's own prefix-cache hit), holds the request in WAITING_FOR_REMOTE_KVS until
the worker reports the load, then schedules it with those tokens computed. A failed load follows
``kv_load_failure_policy``; an abort while loading keeps the blocks until the worker has fenced
the pull. Every case ends with no block held and no request state in our connector.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROMPT = list(range(10, 110))  # 100 tokens: 7 blocks of 16


@pytest.fixture
def p_params(instance) -> dict:
    """The kv_transfer_params a real P scheduler returns for PROMPT (P's worker then releases it)."""
    p = instance("kv_producer")
    p.add("p", PROMPT, {"do_remote_decode": True})
    while not (out := p.step().outputs.get("p")) or out.finish_reason is None:
        pass
    return out.kv_transfer_params


def _load_started(d, req_id: str, params: dict, **add):
    d.add(req_id, PROMPT, params, **add)
    step = d.step()
    (load,) = step.meta.loads
    request = d.request(req_id)
    assert request.status.name == "WAITING_FOR_REMOTE_KVS"
    assert step.scheduled.num_scheduled_tokens == {}  # nothing computes while the KV arrives
    assert load.blocks == tuple(tuple(b) for b in d.scheduler.kv_cache_manager.get_block_ids(req_id))
    assert (load.transfer_id, load.addresses) == (params["transfer_id"], tuple(params["remote_addresses"]))
    return load


def _drain(d) -> None:
    for _ in range(40):
        if not d.scheduler.requests:
            break
        d.step()
    assert d.held_blocks() == 0
    assert not d.scheduler.requests
    assert d.side.tracked_requests() == set()


def _hits_by_source(d) -> dict[str, int]:
    """The connector's cache hits by source over every step (vLLM resets its stats each step)."""
    hits: dict[str, int] = {}
    for stats in d.stats:
        for source, n in stats.connector_prefix_cache_stats.hits_by_source.items():
            hits[source.value] = hits.get(source.value, 0) + n
    return hits


@pytest.mark.parametrize("local_hit", [0, 32])
def test_decode_loads_the_prompt_then_decodes(instance, p_params, local_hit: int) -> None:
    d = instance("kv_consumer")
    if local_hit:
        # An earlier request computed the first 40 tokens here: D keeps its 2 full blocks and loads the rest.
        d.add("warm", PROMPT[:40], None)
        while d.scheduler.requests:
            d.step()
    load = _load_started(d, "d1", p_params, max_tokens=4)
    assert load.start_token == local_hit
    for _ in range(3):  # the pull takes its time
        assert d.step().scheduled.num_scheduled_tokens == {}
    d.step(recving={"d1"})
    step = d.step()
    # Every prompt token is computed (loaded or cached) but the last, which D computes to sample.
    (new,) = step.scheduled.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens, step.scheduled.num_scheduled_tokens) == ("d1", 99, {"d1": 1})
    assert step.outputs["d1"].new_token_ids == [7]
    stats = step.outputs["d1"].prefill_stats  # feeds vllm:prompt_tokens_by_source
    assert (stats.num_external_cached_tokens, stats.num_local_cached_tokens) == (100 - local_hit, local_hit)
    tokens = [7]
    while d.scheduler.requests:
        step = d.step()
        tokens += step.outputs["d1"].new_token_ids if "d1" in step.outputs else []
    assert tokens == [7] * 4
    assert (d.side.tokens_loaded, d.side.tokens_computed_after_load) == (100 - local_hit, 1)
    assert _hits_by_source(d) == {"p2p": 100 - local_hit}  # feeds vllm:prompt_tokens_cached_by_source
    _drain(d)


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_failed_load_follows_the_failure_policy(instance, p_params, policy: str) -> None:
    d = instance("kv_consumer", failure_policy=policy)
    _load_started(d, "d1", p_params, max_tokens=3)
    # What WorkerSide reports for a failed pull: the request in failed_recving and in finished_recving.
    step = d.step(recving={"d1"}, failed={"d1"})
    if policy == "fail":
        out = step.outputs["d1"]
        assert out.new_token_ids == []
        assert out.finish_reason is not None
        assert out.finish_reason.name == "ERROR"
        _drain(d)
        return
    # recompute: the whole prompt is computed locally, in 64 + 36 tokens, and decoding goes on.
    scheduled = [d.step().scheduled.num_scheduled_tokens.get("d1") for _ in range(2)]
    assert scheduled == [64, 36]
    assert d.request("d1").num_computed_tokens == 100
    _drain(d)
    assert d.side.tokens_loaded == 100


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_block_level_load_errors_follow_the_failure_policy(instance, p_params, policy: str) -> None:
    """vLLM's other failure report, per block: the first invalid block and all after it are lost."""
    d = instance("kv_consumer", failure_policy=policy)
    load = _load_started(d, "d1", p_params, max_tokens=2)
    step = d.step(recving={"d1"}, invalid_blocks={load.blocks[0][3]})
    if policy == "fail":
        assert step.outputs["d1"].finish_reason.name == "ERROR"
        _drain(d)
        return
    step = d.step()
    (new,) = step.scheduled.scheduled_new_reqs
    assert new.num_computed_tokens == 3 * 16  # the 3 blocks before the invalid one stay loaded
    _drain(d)


@pytest.mark.parametrize("report", ["after", "before"])
def test_abort_while_loading_keeps_blocks_until_the_pull_is_fenced(instance, p_params, report: str) -> None:
    d = instance("kv_consumer")
    load = _load_started(d, "d1", p_params)
    held = d.held_blocks()
    if report == "before":
        # The worker reported the load just before the abort: nothing is left to fence.
        d.step(recving={"d1"})
        d.abort("d1")
        assert d.step().meta.cancelled_loads == []
        _drain(d)
        return
    d.abort("d1")
    step = d.step()
    # The worker is told to stop the pull; vLLM keeps the blocks it writes into until it reports.
    assert step.meta.cancelled_loads == [("d1", load.transfer_id)]
    for _ in range(3):
        d.step()
        assert d.held_blocks() == held
    d.step(recving={"d1"})
    _drain(d)
