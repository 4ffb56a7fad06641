"""Turn vLLM's registered KV caches into engine-neutral cache descriptions and a signature."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import torch

from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import signature_hash
from llumnix_kv_core.wire import VERSION as WIRE_VERSION

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def _kind(spec: Any) -> str:
    from vllm.v1.kv_cache_interface import AttentionSpec
    from vllm.v1.kv_cache_interface import MambaSpec
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    if isinstance(spec, MLAAttentionSpec):
        return "mla"
    if isinstance(spec, MambaSpec):
        return "mamba"
    if isinstance(spec, AttentionSpec):
        return "attention"
    return type(spec).__name__


def _backend_names(vllm_config: VllmConfig, layer_names: list[str]) -> dict[str, str]:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    return {name: layer.get_attn_backend().get_name() for name, layer in layers.items()}


def _cpu_isa(spec: Any, dtype: torch.dtype, cache_dtype: str) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, spec.block_size, spec.head_size, cache_dtype)


def describe_groups(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, kv_caches: dict[str, torch.Tensor]
) -> list[CacheGroupDescription]:
    layout = str(vllm_config.cache_config.kv_cache_layout or "")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    out = []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        names = [n for n in group.layer_names if n in kv_caches]
        spec = group.kv_cache_spec
        backends = _backend_names(vllm_config, names)
        backend_set = set(backends.values())
        if len(backend_set) > 1:
            from llumnix_kv_core.errors import LayoutError

            msg = f"cache group {gid} mixes attention backends {sorted(backend_set)}"
            raise LayoutError(msg)
        backend = backend_set.pop() if backend_set else ""
        tensors = []
        for name in names:
            t = kv_caches[name]
            es = t.element_size()
            tensors.append(TensorDescription(name, t.data_ptr(), tuple(t.shape), tuple(s * es for s in t.stride()),
                                             es, t.device.type))
        dtype = getattr(spec, "dtype", None)
        extra: dict[str, Any] = {
            "num_kv_heads": getattr(spec, "num_kv_heads", None),
            "head_size": getattr(spec, "head_size", None),
            "head_size_v": getattr(spec, "head_size_v", None),
        }
        if backend == "CPU_ATTN" and dtype is not None:
            extra["isa"] = _cpu_isa(spec, dtype, cache_dtype)
        out.append(CacheGroupDescription("vllm", gid, _kind(spec), backend, layout, spec.block_size,
                                         str(dtype), tuple(tensors), extra))
    return out


def engine_signature(vllm_config: VllmConfig, layout_signatures: list[Any]) -> dict[str, Any]:
    """What the two instances of a transfer must agree on; compared field by field at handshake."""
    import vllm

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    hf = {k: v for k, v in mc.hf_config.to_dict().items() if not k.startswith("_") and k != "torch_dtype"}
    return {
        "protocol": WIRE_VERSION,
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        # The model's architecture and configuration, not its path: instances load it from anywhere.
        "model": ",".join(mc.architectures or ()),
        "model_config": signature_hash(hf),
        "dtype": str(mc.dtype),
        "cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "num_layers": mc.get_num_layers(pc),
        "num_kv_heads": mc.get_num_kv_heads(pc),
        "head_size": mc.get_head_size(),
        "tensor_parallel_size": pc.tensor_parallel_size,
        "pipeline_parallel_size": pc.pipeline_parallel_size,
        "groups": layout_signatures,
    }
