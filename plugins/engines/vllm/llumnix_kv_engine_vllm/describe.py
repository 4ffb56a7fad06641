"""Turn vLLM's registered KV caches into engine-neutral cache descriptions and a signature."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import torch

from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import signature_hash
from llumnix_kv_core.wire import VERSION as WIRE_VERSION
from llumnix_kv_engine_vllm.compat import cpu_attention_isa

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


def attention_backends(vllm_config: VllmConfig, layer_names: list[str]) -> dict[str, str]:
    """Each layer's attention backend name, read from the model's layers (worker process, after model load)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    return {name: layer.get_attn_backend().get_name() for name, layer in layers.items()}


INDEXER_BACKENDS = frozenset({"DEEPSEEK_V32_INDEXER"})


def _layer_specs(spec: Any) -> list[Any]:
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    return list(spec.kv_cache_specs.values()) if isinstance(spec, UniformTypeKVCacheSpecs) else [spec]


def _role(spec: Any) -> str:
    role = getattr(spec, "cache_role", None)
    return "indexer" if role is not None and str(getattr(role, "value", role)) == "indexer" else "latent"


def spec_extra(vllm_config: VllmConfig, spec: Any) -> dict[str, Any]:
    """What layout parsers need besides the tensors: TP split, global head count, state shapes."""
    pc, mc = vllm_config.parallel_config, vllm_config.model_config
    extra: dict[str, Any] = {
        "tp_size": pc.tensor_parallel_size,
        "cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "num_kv_heads": getattr(spec, "num_kv_heads", None),
        "head_size": getattr(spec, "head_size", None),
        "head_size_v": getattr(spec, "head_size_v", None),
    }
    if getattr(spec, "num_kv_heads", None):
        extra["total_num_kv_heads"] = mc.get_total_num_kv_heads()
        slots = getattr(spec, "num_head_slots", None)
        if slots:
            extra["slots_per_head"] = slots // spec.num_kv_heads
    if getattr(spec, "cache_dtype_str", None):
        extra["cache_dtype"] = spec.cache_dtype_str
    if hasattr(spec, "shapes") and hasattr(spec, "dtypes"):  # MambaSpec
        from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

        extra.update(
            shapes=[list(x) for x in spec.shapes],
            itemsizes=[torch.empty((), dtype=d).element_size() for d in spec.dtypes],
            dtypes=",".join(str(d) for d in spec.dtypes),
            mamba_type=str(getattr(spec.mamba_type, "name", spec.mamba_type)),
            conv_layout="DS" if is_conv_state_dim_first() else "SD",
            num_speculative_blocks=int(getattr(spec, "num_speculative_blocks", 0)),
        )
    return extra


def _cpu_isa(spec: Any, dtype: torch.dtype, cache_dtype: str) -> str:
    return cpu_attention_isa(dtype, spec.block_size, spec.head_size, cache_dtype)


def describe_groups(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, kv_caches: dict[str, torch.Tensor],
    backends: dict[str, str],
) -> list[CacheGroupDescription]:
    """One description per cache group of the registered ``kv_caches`` (layer name -> vLLM's view).

    Every view is described by its own address, shape and strides: layers may share one
    allocation (vLLM's standard cache) or each have its own (0.34's extensible cache).
    ``backends`` maps layer names to their attention backend (``attention_backends``).
    """
    layout = str(vllm_config.cache_config.kv_cache_layout or "")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    out = []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        names = [n for n in group.layer_names if n in kv_caches]
        specs = _layer_specs(group.kv_cache_spec)
        spec = specs[0]
        per_layer = (dict(group.kv_cache_spec.kv_cache_specs) if len(specs) > 1 else dict.fromkeys(names, spec))
        # DSA: the indexer layers share the group with the MLA layers, under their own backend.
        roles = {n: ("indexer" if backends.get(n) in INDEXER_BACKENDS else _role(per_layer.get(n, spec)))
                 for n in names}
        backend_set = {backends[n] for n in names if n in backends and roles[n] != "indexer"}
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
        latent = next((per_layer[n] for n in names if roles[n] == "latent" and n in per_layer), spec)
        dtype = getattr(latent, "dtype", None)
        extra = spec_extra(vllm_config, latent)
        if "indexer" in roles.values():
            extra["roles"] = roles
        if backend == "CPU_ATTN" and dtype is not None:
            extra["isa"] = _cpu_isa(spec, dtype, cache_dtype)
        out.append(CacheGroupDescription("vllm", gid, _kind(latent), backend, layout, spec.block_size,
                                         str(dtype), tuple(tensors), extra))
    return out


def engine_signature(vllm_config: VllmConfig, layout_signatures: list[Any]) -> dict[str, Any]:
    """What the two instances of a transfer must agree on; compared field by field at handshake.

    Tensor-parallel sizes may differ (one must divide the other): each side's TP rank and size
    travel in the handshake and the plan compiler checks that it can map the two.
    """
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
        "total_num_kv_heads": mc.get_total_num_kv_heads(),
        "head_size": mc.get_head_size(),
        "pipeline_parallel_size": pc.pipeline_parallel_size,
        "groups": layout_signatures,
    }
