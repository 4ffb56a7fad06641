"""vLLM's own ``Scheduler`` with LlumnixKVConnector, fed model-runner outputs by hand.

No model runs and no GPU is needed: each step, the scheduler schedules, and the test answers as
a model runner would (a sampled token for every request whose prompt is complete, nothing for a
partial prefill) plus what the worker-side connector would report (``finished_sending``,
``finished_recving``, ``failed_recving``, invalid blocks). Everything else is the installed vLLM's
scheduling code, so tests built on this run unchanged on every supported vLLM version.

Differences between vLLM versions that only this harness meets (not the adapter) are found by
feature detection here: ``ModelRunnerOutput.req_id_to_index`` (0.32/0.33, gone in 0.34).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from llumnix_kv_engine_vllm.metadata import LlumnixConnectorMetadata
from llumnix_kv_engine_vllm.metadata import LlumnixHandshakeMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from llumnix_kv_engine_vllm.scheduler import SchedulerSide

SAMPLED_TOKEN = 7  # what the "model" samples; never the tiny model's EOS
ATTENTION_LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
GDN_LAYER = "model.layers.0.linear_attn"  # the hybrid case's state layer (in place of layer 0's attention)


def make_vllm_config(model: Path, role: str, *, block_size: int = 16, token_budget: int = 64,
                     max_num_seqs: int = 8, max_model_len: int = 2048, failure_policy: str = "fail",
                     port: int = 0) -> VllmConfig:
    """A VllmConfig for the tiny model in ``model`` with LlumnixKVConnector in ``role`` (offline, CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.config import CacheConfig
    from vllm.config import DeviceConfig
    from vllm.config import KVTransferConfig
    from vllm.config import ModelConfig
    from vllm.config import SchedulerConfig
    from vllm.config import VllmConfig

    model_config = ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=max_model_len, seed=0)
    kv = KVTransferConfig(kv_connector="LlumnixKVConnector",
                          kv_connector_module_path="llumnix_kv_engine_vllm.connector", kv_role=role,
                          kv_load_failure_policy=failure_policy,
                          kv_connector_extra_config={"scenario": "pd", "transport": "tcp", "port": port})
    return VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=token_budget,
                                         max_model_len=max_model_len, enable_chunked_prefill=True,
                                         is_encoder_decoder=False),
        kv_transfer_config=kv,
        device_config=DeviceConfig("cpu"),
    )


def attention_cache_config(vllm_config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """One full-attention group over the tiny Llama's two layers, ``num_blocks`` blocks (block 0 is vLLM's null)."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    mc = vllm_config.model_config
    spec = FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                             num_kv_heads=mc.get_total_num_kv_heads(), head_size=mc.get_head_size(),
                             dtype=torch.bfloat16)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(ATTENTION_LAYERS), spec)])


def hybrid_cache_config(vllm_config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """A GDN hybrid: one full-attention layer group and one GDN state group, prefix caching in "align" mode.

    Like vLLM's hybrid models with prefix caching, the state group has the attention block size and
    keeps a state slot at each block boundary the request reaches, plus its latest state.
    """
    import torch
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec
    from vllm.v1.kv_cache_interface import MambaSpec

    attention = attention_cache_config(vllm_config, num_blocks).kv_cache_groups[0]
    state = MambaSpec(block_size=vllm_config.cache_config.block_size, shapes=((3, 256), (2, 64, 64)),
                      dtypes=(torch.bfloat16, torch.bfloat16), mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
                      mamba_cache_mode="align")
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([ATTENTION_LAYERS[1]], attention.kv_cache_spec),
        KVCacheGroupSpec([GDN_LAYER], state),
    ])


@dataclass
class Step:
    """One scheduler step: what vLLM scheduled, our connector's metadata, and the request outputs."""

    scheduled: SchedulerOutput
    meta: LlumnixConnectorMetadata
    outputs: dict[str, EngineCoreOutput]


class SchedulerInstance:
    """One engine's scheduler process: vLLM's ``Scheduler`` with our connector as its KV connector."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                 address: str = "127.0.0.1:15500") -> None:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(vllm_config),
                                   block_size=self.block_size, log_stats=True)
        connector = self.scheduler.get_kv_connector()
        assert connector is not None
        self.connector = connector
        # What EngineCore does once the workers registered their caches: hand their addresses over.
        handshake = {0: LlumnixHandshakeMetadata(address, "")}
        if hasattr(connector, "set_xfer_handshake_metadata_pp_aware"):
            connector.set_xfer_handshake_metadata_pp_aware({(0, r): m for r, m in handshake.items()})
        else:
            connector.set_xfer_handshake_metadata(handshake)
        self.free_at_start = self.free_blocks()
        self.stats: list[Any] = []  # SchedulerStats of every step

    @property
    def side(self) -> SchedulerSide:
        side = self.connector._scheduler
        assert side is not None
        return side

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def held_blocks(self) -> int:
        """Blocks taken from the pool since this instance started (0 once every request let go)."""
        return self.free_at_start - self.free_blocks()

    def add(self, req_id: str, prompt: list[int], params: dict[str, Any] | None = None,
            max_tokens: int = 1) -> Request:
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.request import Request

        init_none_hash(sha256)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  extra_args={"kv_transfer_params": params} if params is not None else None)
        request = Request(request_id=req_id, prompt_token_ids=list(prompt), sampling_params=sampling,
                          pooling_params=None, block_hasher=get_request_block_hasher(self.block_size, sha256))
        self.scheduler.add_request(request)
        return request

    def request(self, req_id: str) -> Request:
        return self.scheduler.requests[req_id]

    def step(self, *, sending: set[str] | None = None, recving: set[str] | None = None,
             failed: set[str] | None = None, invalid_blocks: set[int] | None = None) -> Step:
        """Schedule, then answer as the model runner and the worker-side connector would."""
        from vllm.v1.outputs import KVConnectorOutput

        scheduled = self.scheduler.schedule()
        meta = scheduled.kv_connector_metadata
        assert isinstance(meta, LlumnixConnectorMetadata)
        req_ids = list(scheduled.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            request = self.scheduler.requests[req_id]
            # A forward samples a token only once the request's whole prompt (and output) is computed.
            sampled.append([SAMPLED_TOKEN] if request.num_computed_tokens >= request.num_tokens else [])
        kv_output = KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                      failed_recving=set(failed or ()), invalid_block_ids=set(invalid_blocks or ()))
        runner_output = _model_runner_output(req_ids, sampled, kv_output)
        engine_outputs = self.scheduler.update_from_output(scheduled, runner_output)
        outputs = {}
        for eco in engine_outputs.values():
            if eco.scheduler_stats is not None:
                self.stats.append(eco.scheduler_stats)
            outputs.update({o.request_id: o for o in eco.outputs})
        return Step(scheduled, meta, outputs)

    def abort(self, req_id: str) -> None:
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)



def _model_runner_output(req_ids: list[str], sampled: list[list[int]], kv_output: Any) -> Any:
    from vllm.v1.outputs import ModelRunnerOutput

    kwargs: dict[str, Any] = {"req_ids": req_ids, "sampled_token_ids": sampled,
                              "kv_connector_output": None if kv_output.is_empty() else kv_output}
    if "req_id_to_index" in {f.name for f in dataclasses.fields(ModelRunnerOutput)}:  # 0.32/0.33
        kwargs["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return ModelRunnerOutput(**kwargs)
