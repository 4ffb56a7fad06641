"""A GDN hybrid (an attention group and a state group, HMA on) through vLLM's own Scheduler.

P stops one prompt token short and at one token, whatever the request asked: D must receive the
state after N-1 tokens and compute token N itself. Every save and load names the block table of
both groups; vLLM holds P's blocks of both until they are reported sent.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROMPT = list(range(10, 110))  # 100 tokens


def _block_table(inst, req_id: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(b) for b in inst.scheduler.kv_cache_manager.get_block_ids(req_id))


def test_hybrid_prefill_then_decode(instance) -> None:
    p = instance("kv_producer", hybrid=True)
    p.add("p1", PROMPT, {"do_remote_decode": True}, max_tokens=8)
    assert p.request("p1").num_prompt_tokens == 99
    saves = []
    while not (out := (step := p.step()).outputs.get("p1")) or out.finish_reason is None:
        saves += step.meta.saves
        for save in step.meta.saves:
            assert save.blocks == _block_table(p, "p1")
            assert len(save.blocks) == 2
    saves += step.meta.saves
    assert [(s.computed_before, s.computed_after, s.prompt_len) for s in saves] == [(0, 64, 99), (64, 99, 99)]
    assert out.new_token_ids == [7]  # one token although 8 were asked
    params = out.kv_transfer_params
    assert params["transfer_id"] == saves[0].transfer_id
    held = p.held_blocks()
    assert held > 0
    p.step()
    assert p.held_blocks() == held
    p.step(sending={"p1"})
    assert p.held_blocks() == 0
    assert p.side.tracked_requests() == set()

    d = instance("kv_consumer", hybrid=True)
    d.add("d1", PROMPT, params, max_tokens=2)
    step = d.step()
    (load,) = step.meta.loads
    assert load.blocks == _block_table(d, "d1")
    assert len(load.blocks) == 2
    assert load.start_token == 0
    assert d.request("d1").status.name == "WAITING_FOR_REMOTE_KVS"
    d.step(recving={"d1"})
    step = d.step()
    (new,) = step.scheduled.scheduled_new_reqs
    # P's 99 tokens arrived; D computes the last prompt token from the state they leave.
    assert (new.num_computed_tokens, step.scheduled.num_scheduled_tokens) == (99, {"d1": 1})
    assert d.side.tokens_loaded == 99
    while d.scheduler.requests:
        d.step()
    assert d.held_blocks() == 0
    assert d.side.tracked_requests() == set()
