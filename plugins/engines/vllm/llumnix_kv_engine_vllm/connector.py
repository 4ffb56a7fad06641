"""``LlumnixKVConnector``: the class vLLM instantiates (once as scheduler, once per worker).

Configuration (``--kv-transfer-config``)::

    {"kv_connector": "LlumnixKVConnector",
     "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
     "kv_connector_extra_config": {"scenario": "pd", "transport": "tcp", "port": 15500, ...}}

``kv_connector_extra_config`` is read into :class:`llumnix_kv_core.config.ConnectorConfig`
(every option, its default and its bounds); unknown keys are refused.

The class is a thin facade: request bookkeeping lives in ``scheduler.SchedulerSide``,
data movement in ``worker.WorkerSide`` (which owns a core ``KVAgent``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from llumnix_kv_core.agent import AgentStats
from llumnix_kv_core.config import ConnectorConfig
from llumnix_kv_core.manager import get_registry
from llumnix_kv_engine_vllm.compat import check_supported
from llumnix_kv_engine_vllm.compat import kv_cache_access_flags
from llumnix_kv_engine_vllm.metadata import LlumnixConnectorMetadata
from llumnix_kv_engine_vllm.metrics import LlumnixKVStats
from llumnix_kv_engine_vllm.metrics import LlumnixPromMetrics
from llumnix_kv_engine_vllm.scheduler import SchedulerSide
from llumnix_kv_engine_vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class LlumnixKVConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_supported(vllm.__version__)
        config = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        registry = get_registry()
        registry.transport(config.transport)  # fail fast, naming the plugin, in every process
        policy = registry.scenario(config.scenario).factory(config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            engine_id = self._kv_transfer_config.engine_id or ""
            backoff = 1 if kv_cache_config is not None and kv_cache_config.has_mamba_layers else 0
            self._scheduler = SchedulerSide(policy, engine_id, [], backoff)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(vllm_config, kv_cache_config, config, get_tensor_model_parallel_rank())

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: KVTransferConfig) -> Any:
        """vLLM 0.34+: how peers reach the device KV cache, as the configured transport declares it."""
        config = ConnectorConfig.from_extra(kv_transfer_config.kv_connector_extra_config)
        return kv_cache_access_flags(get_registry().transport(config.transport).device_access)

    # -- scheduler side ------------------------------------------------------------------------------
    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        """Tokens loaded for ``request`` by source, for ``vllm:prompt_tokens_cached_by_source``."""
        assert self._scheduler is not None
        return {CacheHitSource(k): n for k, n in self._scheduler.hit_sources(request, num_external_tokens).items()}

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: Request) -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is not None:
            self._scheduler.loads_reported(connector_output.finished_recving)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LlumnixConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        assert self._scheduler is not None
        self._scheduler.set_addresses(metadata)

    # -- worker side ---------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> Any:
        return self._worker.handshake_metadata() if self._worker is not None else None

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, LlumnixConnectorMetadata):
            self._worker.preempted(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, LlumnixConnectorMetadata):
            self._worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Loads were already started at metadata binding; they complete asynchronously."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Asynchronous loads finish before the request is scheduled: nothing to wait for."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.end_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving = self.get_finished(finished_req_ids)
        assert self._worker is not None
        return KVConnectorTransferResults(set(sending or ()), set(recving or ()),
                                          self._worker.take_failed_recving())

    def get_kv_connector_stats(self) -> LlumnixKVStats | None:
        """This worker's transfers that ended since the last call, for vLLM's logs and /metrics."""
        if self._worker is None or self._worker.agent is None:
            return None
        stats = LlumnixKVStats()
        for rec in self._worker.agent.take_records():
            stats.record(rec)
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LlumnixKVStats:
        return LlumnixKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> LlumnixPromMetrics:
        return LlumnixPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def load_accounting(self) -> tuple[int, int]:
        """Scheduler side: (prompt tokens loaded remotely, prompt tokens computed locally for them)."""
        assert self._scheduler is not None
        return self._scheduler.tokens_loaded, self._scheduler.tokens_computed_after_load

    def recent_load_errors(self) -> list[tuple[str, str]]:
        """Worker side: the last failed loads as (request id, reason)."""
        return list(self._worker.recent_errors) if self._worker is not None else []

    def transfer_stats(self) -> AgentStats | None:
        """Bytes moved and receive time of this worker (for tools and tests)."""
        if self._worker is None or self._worker.agent is None:
            return None
        return self._worker.agent.stats()
