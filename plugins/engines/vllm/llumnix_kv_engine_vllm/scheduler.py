"""Scheduler-side half of LlumnixKVConnector: request bookkeeping, no I/O."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from llumnix_kv_core.interfaces.policy import LoadPlan
from llumnix_kv_core.interfaces.policy import SavePlan
from llumnix_kv_core.interfaces.policy import ScenarioPolicy
from llumnix_kv_engine_vllm.compat import resumed_req_ids
from llumnix_kv_engine_vllm.compat import skips_external_kv
from llumnix_kv_engine_vllm.compat import truncate_prompt
from llumnix_kv_engine_vllm.metadata import LlumnixConnectorMetadata
from llumnix_kv_engine_vllm.metadata import LoadTask
from llumnix_kv_engine_vllm.metadata import SaveFinished
from llumnix_kv_engine_vllm.metadata import SaveStep

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(self, policy: ScenarioPolicy, engine_id: str, fallback_addresses: list[str],
                 backoff: int = 0) -> None:
        self.policy = policy
        # Trailing prompt tokens P does not compute and D computes itself. Mamba/GDN models need
        # 1: D must receive the state after N-1 tokens to compute token N from it.
        self.backoff = backoff
        self.engine_id = engine_id
        self.addresses = fallback_addresses
        self._loading: dict[str, LoadPlan] = {}  # req_id -> plan, once blocks are allocated
        self._received: set[str] = set()  # loads the workers reported finished (vLLM saw finished_recving)
        self._saving: dict[str, tuple[SavePlan, list[list[int]], int]] = {}  # req -> (plan, blocks, prompt)
        self._meta = LlumnixConnectorMetadata()
        self._first_schedule: set[str] = set()  # loaded requests not yet scheduled
        # Accounting of decode-side loads: prompt tokens that arrived over the wire, and prompt
        # tokens the engine still computed itself for those requests (normally one each).
        self.tokens_loaded = 0
        self.tokens_computed_after_load = 0

    def tracked_requests(self) -> set[str]:
        """Requests this side keeps state for (loads, saves, loaded requests not yet scheduled)."""
        return set(self._loading) | set(self._saving) | self._first_schedule | self._received

    def loads_reported(self, finished_recving: set[str] | None) -> None:
        """The workers' ``finished_recving`` of a step, as vLLM's scheduler receives it."""
        self._received.update(r for r in finished_recving or () if r in self._loading)

    def set_addresses(self, by_rank: dict[int, Any]) -> None:
        self.addresses = [by_rank[r].address for r in sorted(by_rank)]

    def on_new_request(self, request: Request) -> None:
        """Prefill side of a model with state layers: stop the prompt ``backoff`` tokens short."""
        params = request.kv_transfer_params
        if not self.backoff or params is None or params.get("_llumnix_truncated"):
            return
        if self.policy.save_plan(params) is None or request.num_prompt_tokens <= self.backoff:
            return
        if request.prompt_token_ids is None or skips_external_kv(request):
            return
        truncate_prompt(request, self.backoff)
        request.max_tokens = 1
        params["_llumnix_truncated"] = True

    def _load_len(self, request: Request) -> int:
        n = request.num_prompt_tokens
        return n - self.backoff if self.backoff and n > self.backoff else n

    # -- decode side -----------------------------------------------------------------------------
    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[str, int]:
        """Where the ``num_external_tokens`` of ``request`` come from (source name -> tokens)."""
        plan = self._loading.get(request.request_id)
        if num_external_tokens <= 0 or plan is None:
            return {}
        return {plan.source: num_external_tokens}

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._loading:
            return 0, False
        plan = self.policy.load_plan(request.kv_transfer_params)
        if plan is None:
            return 0, False
        n = self._load_len(request) - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0 or request.request_id in self._loading:
            return
        plan = self.policy.load_plan(request.kv_transfer_params)
        if plan is None:
            return
        self._loading[request.request_id] = plan
        self._first_schedule.add(request.request_id)
        self.tokens_loaded += num_external_tokens
        block_ids = blocks.get_block_ids()
        self._meta.loads.append(
            LoadTask(
                request.request_id,
                plan.transfer_id,
                plan.remote_addresses,
                tuple(tuple(b) for b in block_ids),
                self._load_len(request) - num_external_tokens,
            )
        )

    # -- prefill side ----------------------------------------------------------------------------
    def _save_step(self, req_id: str, computed: int, scheduled: int) -> None:
        plan, blocks, prompt_len = self._saving[req_id]
        if computed >= prompt_len:
            return
        self._meta.saves.append(
            SaveStep(req_id, plan.transfer_id, tuple(tuple(b) for b in blocks), computed,
                     min(computed + scheduled, prompt_len), prompt_len)
        )

    def build_connector_meta(self, out: SchedulerOutput) -> LlumnixConnectorMetadata:
        for req_id in out.preempted_req_ids or ():
            if req_id in self._saving:
                # Its blocks are freed now; the resumed request brings new ones.
                plan, blocks, _ = self._saving[req_id]
                blocks[:] = [[] for _ in blocks]
                self._meta.preempted_saves.append(plan.transfer_id)
        for new in out.scheduled_new_reqs:
            if new.req_id in self._first_schedule:
                self._first_schedule.discard(new.req_id)
                self.tokens_computed_after_load += out.num_scheduled_tokens[new.req_id]
            params = new.sampling_params.extra_args.get("kv_transfer_params") if (
                new.sampling_params and new.sampling_params.extra_args) else None
            plan = self.policy.save_plan(params) if new.req_id not in self._saving else None
            if plan is not None:
                prompt_len = len(new.prompt_token_ids or ())
                self._saving[new.req_id] = (plan, [list(b) for b in new.block_ids], prompt_len)
            if new.req_id in self._saving:
                # A new request, or (vLLM 0.34) one resumed after preemption: its whole block table.
                self._saving[new.req_id][1][:] = [list(b) for b in new.block_ids]
                self._save_step(new.req_id, new.num_computed_tokens, out.num_scheduled_tokens[new.req_id])
        cached = out.scheduled_cached_reqs
        resumed = resumed_req_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._saving:
                continue
            _plan, blocks, _ = self._saving[req_id]
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in resumed:
                    blocks[:] = [list(b) for b in new_ids]
                else:
                    for g, b in enumerate(new_ids):
                        blocks[g].extend(b)
            self._save_step(req_id, cached.num_computed_tokens[i], out.num_scheduled_tokens[req_id])
        meta, self._meta = self._meta, LlumnixConnectorMetadata()
        return meta

    def request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        self._first_schedule.discard(req_id)
        load = self._loading.pop(req_id, None)
        if load is not None:
            if req_id in self._received:
                self._received.discard(req_id)
                return False, None
            # Finished (aborted, or failed by vLLM) while its KV may still be arriving: the worker
            # fences the pull and reports it in finished_recving, and vLLM frees the blocks then.
            # vLLM (0.32-0.34) keeps them for that report by itself; saying so too is what it expects.
            self._meta.cancelled_loads.append((req_id, load.transfer_id))
            return True, None
        saving = self._saving.pop(req_id, None)
        if saving is None:
            return False, None
        plan, _blocks, prompt_len = saving
        has_blocks = any(block_ids)
        ok = has_blocks and request.num_computed_tokens >= prompt_len
        self._meta.finished_saves.append(SaveFinished(req_id, plan.transfer_id, ok, plan.lease_s, has_blocks))
        if not ok:
            # Aborted before its prefill completed: blocks stay until the sender has stopped reading them.
            return has_blocks, None
        return True, self.policy.output_params(plan, self.addresses, self.engine_id)
