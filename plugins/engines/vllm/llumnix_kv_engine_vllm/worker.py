"""Worker-side half of LlumnixKVConnector: owns the transfer agent of this worker process.

Nothing here waits for the network: layer hooks append to the sender's queue,
loads are started on the agent's threads, and completions are polled.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llumnix_kv_core.agent import KVAgent
from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import MOVES_LAST_STATE
from llumnix_kv_core.layout import signature_hash
from llumnix_kv_core.manager import get_registry
from llumnix_kv_engine_vllm.describe import attention_backends
from llumnix_kv_engine_vllm.describe import describe_groups
from llumnix_kv_engine_vllm.describe import engine_signature
from llumnix_kv_engine_vllm.gpu_events import LayerEvents
from llumnix_kv_engine_vllm.metadata import LlumnixConnectorMetadata
from llumnix_kv_engine_vllm.metadata import LlumnixHandshakeMetadata
from llumnix_kv_engine_vllm.metadata import LoadTask

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from llumnix_kv_core.config import ConnectorConfig

log = logging.getLogger(__name__)


@dataclass
class SendState:
    """Prefill side: a transfer whose source blocks the sender keeps until a receiver has them."""

    req_id: str
    engine_waits: bool = True  # vLLM frees the blocks only after a finished_sending report
    released: bool = False  # the sender let go of the blocks
    engine_finished: bool = False  # vLLM reported the request finished


@dataclass
class LoadState:
    """Decode side: a transfer being pulled into the request's blocks."""

    task: LoadTask
    cancelled: bool = False  # vLLM aborted the request; its blocks stay until the pull is fenced


class WorkerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: ConnectorConfig,
                 rank: int) -> None:
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.config = config
        self.rank = rank
        self.agent: KVAgent | None = None
        self._events: LayerEvents | None = None  # GPU caches: per-layer readiness events
        self.block_sizes: dict[int, int] = {
            g: grp.kv_cache_spec.block_size for g, grp in enumerate(kv_cache_config.kv_cache_groups)
        }
        self._layer_group: dict[str, int] = {}
        # Groups whose blocks are state slots (Mamba/GDN): only the last valid state block moves,
        # once the prefill is complete; value: trailing speculative scratch slots to skip.
        self._state_groups: dict[int, int] = {}
        self._step_saves: list = []
        self._transfers: dict[str, SendState | LoadState] = {}  # transfer id -> its state on this worker
        self._owed_failed: set[str] = set()  # failed loads owed to vLLM's next failed_recving (request ids)
        self.recent_errors: deque[tuple[str, str]] = deque(maxlen=100)  # (request id, why a load failed)

    # -- setup -------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        registry = get_registry()
        devices = {t.device.type for t in kv_caches.values()}
        provider = registry.transport(self.config.transport)
        kinds = provider.memory_kinds
        if devices != {"cpu"} and not (devices == {"cuda"} and "cuda" in kinds):
            msg = (f"KV caches live on {sorted(devices)}; the {self.config.transport!r} transport moves "
                   f"{' and '.join(kinds)} memory only. Use a transport that supports device memory "
                   "(e.g. shm between GPUs of one host).")
            raise LayoutError(msg)
        device = "cpu"
        if devices == {"cuda"}:
            index = next(iter(kv_caches.values())).device.index or 0
            device = f"cuda:{index}"
            self._events = LayerEvents(list(kv_caches), index)
        backends = attention_backends(self.vllm_config, list(kv_caches))
        layouts = [registry.parse_layout(d)
                   for d in describe_groups(self.vllm_config, self.kv_cache_config, kv_caches, backends)]
        for lay in layouts:
            for t in lay.tensors:
                self._layer_group[t.name] = lay.group_id
            if lay.moves == MOVES_LAST_STATE:
                spec = self.kv_cache_config.kv_cache_groups[lay.group_id].kv_cache_spec
                self._state_groups[lay.group_id] = int(getattr(spec, "num_speculative_blocks", 0) or 0)
        signature = engine_signature(self.vllm_config, [dict(lay.signature) for lay in layouts])
        self.agent = KVAgent(provider.factory(self.config.transport_config()), layouts, signature,
                             timeout_s=self.config.transfer_timeout_s, device=device,
                             tp_rank=self.rank, tp_size=self.vllm_config.parallel_config.tensor_parallel_size)
        if self.vllm_config.kv_transfer_config.is_kv_producer:
            port = self.config.port
            addr = self.agent.listen(self.config.host, port + self.rank if port else 0)
            log.info("llumnix-kv worker %d listening on %s (%s)", self.rank, addr, self.config.transport)
        self.signature_hash = signature_hash(signature)

    def handshake_metadata(self) -> LlumnixHandshakeMetadata | None:
        if self.agent is None:
            return None
        return LlumnixHandshakeMetadata(self.agent.address or "", self.signature_hash)

    # -- per step ------------------------------------------------------------------------------------
    def _positions(self, group: int, tokens: int) -> int:
        return math.ceil(tokens / self.block_sizes[group])

    def _blocks(self, per_group: tuple[tuple[int, ...], ...] | list[list[int]]) -> dict[int, list[int]]:
        """What moves of each group: token blocks as they are; of a state group its last valid state slot."""
        out = {}
        for g, b in enumerate(per_group):
            b = list(b)
            if g in self._state_groups:
                spec_slots = min(self._state_groups[g], max(len(b) - 1, 0))
                b = (b[:-spec_slots] if spec_slots else b)[-1:]
            out[g] = b
        return out

    def bind(self, meta: LlumnixConnectorMetadata) -> None:
        agent = self.agent
        assert agent is not None, "register_kv_caches was not called"
        for task in meta.loads:
            blocks = self._blocks(task.blocks)
            start = {g: 0 if g in self._state_groups else task.start_token // self.block_sizes[g] for g in blocks}
            self._transfers[task.transfer_id] = LoadState(task)
            # Every prefill TP rank's address: this rank pulls from those that hold its slices.
            agent.receiver.start(task.transfer_id, list(task.addresses), blocks, start)
        for _req_id, tid in meta.cancelled_loads:
            load = self._transfers.get(tid)
            if not isinstance(load, LoadState):
                # Already reported in finished_recving: vLLM frees the blocks on that report.
                continue
            load.cancelled = True
            agent.receiver.cancel(tid)
        for s in meta.saves:
            self._transfers.setdefault(s.transfer_id, SendState(s.req_id))
            blocks = self._blocks(s.blocks)
            ready = {g: 0 if g in self._state_groups else s.computed_before // self.block_sizes[g] for g in blocks}
            agent.sender.open(s.transfer_id, blocks, ready)
        self._step_saves = meta.saves
        for f in meta.finished_saves:
            send = self._transfers.setdefault(f.transfer_id, SendState(f.req_id))
            assert isinstance(send, SendState)
            send.engine_waits = f.delayed
            agent.sender.seal(f.transfer_id, f.ok, f.lease_s)

    def preempted(self, meta: LlumnixConnectorMetadata) -> None:
        """Before the forward reuses a preempted request's blocks: stop every send reading them."""
        if self.agent is None:
            return
        for tid in meta.preempted_saves:
            self.agent.sender.preempt(tid, self.config.io_timeout_s)

    def save_layer(self, layer_name: str) -> None:
        group = self._layer_group.get(layer_name)
        if group is None or self.agent is None or group in self._state_groups or not self._step_saves:
            return
        event = self._events.record_layer(layer_name) if self._events is not None else None
        for s in self._step_saves:
            lo = s.computed_before // self.block_sizes[group]
            self.agent.sender.layer_ready(s.transfer_id, layer_name, lo, self._positions(group, s.computed_after),
                                          ready_event=event)

    def end_step(self) -> None:
        assert self.agent is not None
        if self._events is not None and self._step_saves:
            # Layers without a hook this step (state groups, full CUDA graphs) wait for the whole step.
            step, missing = self._events.end_step()
            for s in self._step_saves:
                for name in missing:
                    self.agent.sender.layer_ready(s.transfer_id, name, 0, 0, ready_event=step)
        for s in self._step_saves:
            if s.computed_after >= s.prompt_len:
                # Mamba/GDN layers have no per-layer hooks: their final state moves now, once.
                positions = {g: 1 if g in self._state_groups else self._positions(g, s.prompt_len)
                             for g in self.block_sizes}
                blocks = self._blocks(s.blocks)
                self.agent.sender.complete(s.transfer_id, positions,
                                           {g: b for g, b in blocks.items() if g in self._state_groups})
        self._step_saves = []

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.agent is None:
            return None, None
        for tid in self.agent.sender.poll_released():
            send = self._transfers.get(tid)
            if isinstance(send, SendState):
                send.released = True
        sending: set[str] = set()
        for tid, send in list(self._transfers.items()):
            if not isinstance(send, SendState):
                continue
            send.engine_finished |= send.req_id in finished_req_ids
            if send.released and (send.engine_finished or not send.engine_waits):
                del self._transfers[tid]
                if send.engine_waits:
                    sending.add(send.req_id)
        done, failed = self.agent.receiver.poll()
        recving: set[str] = set()
        for tid in done:
            recving.add(self._pop_load(tid).task.req_id)
        for tid, why in failed.items():
            load = self._pop_load(tid)
            req_id = load.task.req_id
            recving.add(req_id)
            if load.cancelled:
                continue
            log.error("KV load of request %s (transfer %s) failed: %s", req_id, tid, why)
            self.recent_errors.append((req_id, why))
            self._owed_failed.add(req_id)
        return sending or None, recving or None

    def _pop_load(self, tid: str) -> LoadState:
        load = self._transfers.pop(tid)
        assert isinstance(load, LoadState), f"transfer {tid} is not a load on this worker"
        return load

    def take_failed_recving(self) -> set[str]:
        out, self._owed_failed = self._owed_failed, set()
        return out

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self._events is not None:
            self._events.close()
            self._events = None
