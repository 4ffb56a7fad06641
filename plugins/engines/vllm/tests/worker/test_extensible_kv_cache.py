"""The worker side on vLLM 0.34's extensible KV cache, with CPU tensors built the way it builds them.

vLLM 0.34 (``v1/worker/extensible_kv_cache.py``) reserves address space for ``capacity`` blocks,
gives every layer its own segment starting on an allocation granule (``pad_kv_cache_segments``)
and, after warmup, hands the connector one view per layer whose storage is that segment's
committed prefix (``committed_views``), with one-layer ``KVCacheTensor`` placements
(``committed_kv_cache_tensors``). Here one host buffer stands for the reservation and each layer's
segment is its own tensor over it. ``describe_groups`` and the layout registry must describe each
layer on its own, and a PD transfer between two ``KVAgent``s over tcp must be byte-exact and write
nothing outside the blocks it targets. Runs on every vLLM version (the views come from its own
``create_kv_cache_views``); on 0.34 the padding is also checked against vLLM's own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pytest.importorskip("vllm")

GRANULE = 2 << 20  # CUDA's VMM commit granule (vLLM's floor)
BACKEND = "FLASH_ATTN"  # the CUDA backend these layouts come from
SB, DB = [3, 4, 5, 0, 11], [7, 8, 9, 1, 2]  # P's blocks -> D's blocks


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


@dataclass
class ExtensibleCache:
    """One worker's cache: the reservation, each layer's view over its own segment, the config it sees."""

    reservation: Any  # numpy uint8: the reserved address range
    views_over: Callable[[Any], dict[str, Any]]  # the layer views over a buffer of the reservation's size
    kv_cache_config: Any  # as the connector receives it (num_blocks = committed blocks)

    @property
    def views(self) -> dict[str, Any]:
        return self.views_over(self.reservation)


def _engine_config(vllm_config: Any, layout: str, capacity: int) -> Any:
    """The engine's KVCacheConfig for ``capacity`` blocks: one tensor for both layers, as vLLM sizes it."""
    from llumnix_kv_engine_vllm.scheduler_harness import attention_cache_config
    from vllm.v1.kv_cache_interface import KVCacheTensor
    from vllm.v1.kv_cache_interface import compute_layout_strides
    from vllm.v1.kv_cache_layout import KVCacheLayout

    config = attention_cache_config(vllm_config, capacity)
    group = config.kv_cache_groups[0]
    strides = compute_layout_strides(group.kv_cache_spec, capacity, len(group.layer_names), KVCacheLayout[layout])
    config.kv_cache_tensors = [KVCacheTensor(size=strides[0] * len(group.layer_names), layers=list(group.layer_names),
                                             layer_stride=strides[0], block_stride=strides[1])]
    return config


def _pad_segments(config: Any) -> Any:
    """``pad_kv_cache_segments`` for a layer-outermost, block-compact layout: each layer's region on a granule."""
    (tensor,) = config.kv_cache_tensors
    padded = dataclasses.replace(tensor, layer_stride=_round_up(tensor.layer_stride, GRANULE),
                                 size=len(tensor.layers) * _round_up(tensor.layer_stride, GRANULE))
    return dataclasses.replace(config, kv_cache_tensors=[padded])


def build_cache(vllm_config: Any, layout: str, capacity: int, committed: int, seed: int) -> ExtensibleCache:
    from vllm.v1.kv_cache_interface import KVCacheTensor
    from vllm.v1.kv_cache_interface import create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    lay = KVCacheLayout[layout]
    # Layouts with a segment per layer.
    assert lay.is_block_compact
    assert not lay.is_block_outermost
    engine = _engine_config(vllm_config, layout, capacity)
    padded = _pad_segments(engine)
    if importlib.util.find_spec("vllm.v1.worker.extensible_kv_cache") is not None:  # vLLM 0.34 on
        from vllm.v1.worker.extensible_kv_cache import pad_kv_cache_segments

        assert pad_kv_cache_segments(engine, lay, GRANULE).kv_cache_tensors == padded.kv_cache_tensors
    (tensor,) = padded.kv_cache_tensors
    group = padded.kv_cache_groups[0]
    reservation = np.random.default_rng(seed).integers(0, 256, tensor.size, dtype=np.uint8)
    offsets = [tensor.offset + i * tensor.layer_stride for i in range(len(tensor.layers))]
    assert all(o % GRANULE == 0 for o in offsets)

    def views_over(buffer: Any) -> dict[str, Any]:
        views = {}
        for name, offset in zip(tensor.layers, offsets):
            # A segment's committed prefix, as its own tensor (ExtensibleTensor.segment_view).
            segment = torch.frombuffer(memoryview(buffer)[offset:offset + committed * tensor.block_stride],
                                       dtype=torch.uint8)
            # committed_views: the layer's view over its segment, placed at the segment's start.
            one = dataclasses.replace(tensor, layers=[name], offset=0)
            (views[name],) = create_kv_cache_views(segment, group.kv_cache_spec, committed, lay, one)
        return views

    # committed_kv_cache_tensors: what the connector's kv_cache_config says of those views.
    placements = [KVCacheTensor(size=committed * tensor.block_stride * len(tensor.layers), layers=[name],
                                layer_stride=committed * tensor.block_stride, block_stride=tensor.block_stride,
                                offset=0) for name in tensor.layers]
    config = dataclasses.replace(padded, num_blocks=committed, kv_cache_tensors=placements)
    vllm_config.cache_config.kv_cache_layout = layout
    return ExtensibleCache(reservation, views_over, config)


def _agent(vllm_config: Any, cache: ExtensibleCache, *, listen: bool):
    from llumnix_kv_engine_vllm.describe import describe_groups
    from llumnix_kv_engine_vllm.describe import engine_signature

    from llumnix_kv_core.agent import KVAgent
    from llumnix_kv_core.interfaces.transport import TransportConfig
    from llumnix_kv_core.manager import get_registry

    registry = get_registry()
    backends = dict.fromkeys(cache.views, BACKEND)
    descriptions = describe_groups(vllm_config, cache.kv_cache_config, cache.views, backends)
    layouts = [registry.parse_layout(d) for d in descriptions]
    signature = engine_signature(vllm_config, [dict(lay.signature) for lay in layouts])
    transport = registry.transport("tcp").factory(TransportConfig(connect_timeout_s=5.0, io_timeout_s=10.0))
    agent = KVAgent(transport, layouts, signature, timeout_s=10.0)
    if listen:
        agent.listen("127.0.0.1", 0)
    return agent, descriptions


def _wait(pred, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_pd_transfer_between_extensible_caches_is_byte_exact(tiny_model, layout: str) -> None:
    from llumnix_kv_engine_vllm.scheduler_harness import make_vllm_config

    from llumnix_kv_core.wire import new_transfer_id

    p_config, d_config = make_vllm_config(tiny_model, "kv_producer"), make_vllm_config(tiny_model, "kv_consumer")
    p = build_cache(p_config, layout, capacity=24, committed=16, seed=1)
    d = build_cache(d_config, layout, capacity=40, committed=20, seed=2)
    p_views, d_views = p.views, d.views
    before = d.reservation.copy()
    p_agent, p_desc = _agent(p_config, p, listen=True)
    d_agent, _ = _agent(d_config, d, listen=False)
    try:
        # Each layer is described, and registered, by its own segment: no region spans another layer or a gap.
        (group,) = p_desc
        assert [t.name for t in group.tensors] == list(p_views)
        for region in p_agent.memory.regions():
            storages = [v.untyped_storage() for v in p_views.values()]
            assert any(s.data_ptr() <= region.addr and region.addr + region.nbytes <= s.data_ptr() + s.nbytes()
                       for s in storages), region
        assert len(p_agent.memory.regions()) == len(p_views)

        tid = new_transfer_id()
        d_agent.receiver.start(tid, [p_agent.address], {0: DB}, {0: 0})
        p_agent.sender.open(tid, {0: SB})
        for name in p_views:
            p_agent.sender.layer_ready(tid, name, 0, len(SB))
        p_agent.sender.complete(tid, {0: len(SB)})
        p_agent.sender.seal(tid, True, 30.0)
        reported: dict[str, str] = {}  # transfer id -> "done" or why it failed

        def poll() -> dict[str, str]:
            done, failed = d_agent.receiver.poll()
            reported.update({**dict.fromkeys(done, "done"), **failed})
            return reported

        assert _wait(poll, "the transfer") == {tid: "done"}
        _wait(lambda: tid in p_agent.sender.poll_released(), "P to release the blocks")
    finally:
        d_agent.close()
        p_agent.close()

    expected = before.copy()
    for name, view in d.views_over(expected).items():
        view[DB] = p_views[name][SB]
    assert np.array_equal(d.reservation, expected)  # the moved blocks, and not one byte elsewhere
    for name, view in d_views.items():
        assert torch.equal(view[DB].view(torch.uint8), p_views[name][SB].view(torch.uint8))  # bytes (NaNs too)
        assert view.untyped_storage().nbytes() == 20 * d.kv_cache_config.kv_cache_tensors[0].block_stride
