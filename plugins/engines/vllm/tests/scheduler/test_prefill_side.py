"""Prefill instance (P, kv_producer): vLLM's own Scheduler with our connector, no model run.

P's request with ``do_remote_decode`` finishes after one token, returns the params D needs and
keeps its blocks until the worker reports them sent; preemption mid-prefill re-sends the resumed
request's new block table; an abort frees every block once the sender let go. Block 0 is vLLM's
null block: 16-token blocks, a 64-token step budget.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROMPT = list(range(10, 110))  # 100 tokens: 7 blocks, two steps (64 + 36)


def _block_table(inst, req_id: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(b) for b in inst.scheduler.kv_cache_manager.get_block_ids(req_id))


def _release(inst, req_id: str, idle_steps: int = 3) -> None:
    """Idle steps keep the blocks; the worker's finished_sending report frees them."""
    held = inst.held_blocks()
    assert held > 0
    for _ in range(idle_steps):
        inst.step()
        assert inst.held_blocks() == held
    inst.step(sending={req_id})
    assert inst.held_blocks() == 0
    assert not inst.scheduler.requests
    assert inst.side.tracked_requests() == set()


def test_prefill_finishes_after_one_token_and_keeps_blocks_until_sent(instance) -> None:
    p = instance("kv_producer")
    p.add("p1", PROMPT, {"do_remote_decode": True}, max_tokens=1)  # the PD protocol's P request
    first = p.step()
    (save,) = first.meta.saves
    assert (save.computed_before, save.computed_after, save.prompt_len) == (0, 64, 100)
    assert save.blocks == _block_table(p, "p1")
    assert "p1" not in first.outputs  # a partial prefill samples nothing
    second = p.step()
    (save2,) = second.meta.saves
    assert (save2.transfer_id, save2.computed_before, save2.computed_after) == (save.transfer_id, 64, 100)
    assert save2.blocks == _block_table(p, "p1")
    assert len(save2.blocks[0]) == 7

    out = second.outputs["p1"]
    assert out.new_token_ids == [7]
    assert out.finish_reason is not None
    assert out.finish_reason.name == "LENGTH"
    params = out.kv_transfer_params
    assert params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False
    assert params["transfer_id"] == save.transfer_id
    assert len(params["transfer_id"]) == 32
    assert params["remote_addresses"] == ["127.0.0.1:15500"]
    assert params["remote_engine_id"] == p.vllm_config.kv_transfer_config.engine_id
    assert p.held_blocks() == 7

    finished = p.step().meta.finished_saves
    assert [(f.req_id, f.transfer_id, f.ok, f.delayed) for f in finished] == [("p1", save.transfer_id, True, True)]
    _release(p, "p1")


def test_preempted_prefill_saves_into_its_new_block_table(instance) -> None:
    """A decode that grows takes the last blocks: vLLM preempts the later P request mid-prefill."""
    p = instance("kv_producer", num_blocks=12)
    p.add("a", list(range(300, 316)), None, max_tokens=4)
    p.add("p1", list(range(10, 170)), {"do_remote_decode": True})
    tid = None
    preempted_at = resumed_at = None
    covered = 0  # prompt tokens whose save the metadata announced, in order
    for i in range(30):
        step = p.step()
        if "p1" in (step.scheduled.preempted_req_ids or ()):
            assert step.meta.preempted_saves == [tid]
            preempted_at = i
        for save in step.meta.saves:
            tid = save.transfer_id
            # Every step's save names the request's whole current block table, resumed or not.
            assert save.blocks == _block_table(p, "p1")
            if preempted_at is not None and resumed_at is None:
                resumed_at = i
                # Resumed with what vLLM still had cached; the rest is computed (and saved) again.
                scheduled = step.scheduled.num_scheduled_tokens["p1"]
                assert save.computed_before == p.request("p1").num_computed_tokens - scheduled
                assert save.computed_before <= covered
            else:
                assert save.computed_before == covered
            covered = save.computed_after
        if "p1" in step.outputs and step.outputs["p1"].finish_reason is not None:
            break
    assert preempted_at is not None, "vLLM did not preempt the P request"
    assert resumed_at is not None
    assert covered == 160
    assert step.outputs["p1"].kv_transfer_params["transfer_id"] == tid
    assert p.request("p1").num_preemptions == 1
    _release(p, "p1")


@pytest.mark.parametrize("when", ["mid-prefill", "preempted", "waiting"])
def test_aborted_prefill_leaves_no_block_held(instance, when: str) -> None:
    p = instance("kv_producer", num_blocks=12)
    if when == "preempted":
        p.add("a", list(range(300, 316)), None, max_tokens=8)
    p.add("p1", list(range(10, 170)), {"do_remote_decode": True})
    if when == "mid-prefill":
        p.step()
        assert p.held_blocks() > 0
    elif when == "preempted":
        assert any(p.step().meta.preempted_saves for _ in range(10)), "vLLM did not preempt the P request"
        assert p.request("p1").num_computed_tokens == 0
    p.abort("p1")
    step = p.step()
    if when == "mid-prefill":
        # The sender may still read the blocks: vLLM keeps them until it reports them released.
        (f,) = step.meta.finished_saves
        assert (f.ok, f.delayed) == (False, True)
        _release(p, "p1")
    else:
        # No block of the request is left (preempted) or was ever taken (waiting): nothing to wait for.
        want = [(False, False)] if when == "preempted" else []
        assert [(f.ok, f.delayed) for f in step.meta.finished_saves] == want
        while p.scheduler.requests:
            p.step()
        assert p.held_blocks() == 0
        assert p.side.tracked_requests() == set()
