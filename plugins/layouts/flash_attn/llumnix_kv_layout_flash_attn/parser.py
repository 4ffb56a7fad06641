"""Parser for standard paged attention pages (vLLM FLASH_ATTN & co., SGLang MHA pools).

vLLM 0.32 hands every attention layer over as a ``[B, H, N, C]`` view into one
int8 pool, C = (head_size + head_size_v) elements holding K then V. The memory
order of B/H/N is the model-wide KVCacheLayout (LBNHC, LBHNC, ...); every offset
here comes from the view's own strides. The heads dim is split over TP ranks.

SGLang's ``MHATokenToKVPool`` ("nhd") keeps per layer a K buffer and a V buffer of
``[rows, heads, dim]`` token slots; a page of ``page_size`` rows is one block. Its
description names them ``<layer>.k`` and ``<layer>.v``.
"""

from __future__ import annotations

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import heads_shard
from llumnix_kv_core.layout import layout_signature
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.pools import slot_rows_layout

STANDARD_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "ROCM_ATTN", "ROCM_AITER_FA",
                               "ROCM_AITER_UNIFIED_ATTN", "TRITON_FLASH_ATTN"})
SGLANG_POOLS = frozenset({"MHATokenToKVPool"})


def vllm_attention_tensors(desc: CacheGroupDescription) -> tuple[TensorLayout, ...]:
    """Regions of vLLM ``[B, H, N, C]`` attention views, heads sharded over TP (K|V fused in C)."""
    out = []
    slots = int(desc.extra.get("slots_per_head", 1) or 1)
    for t in desc.tensors:
        if len(t.shape) != 4:
            msg = f"tensor {t.name!r} has shape {t.shape}; a [blocks, heads, tokens, content] view was expected"
            raise LayoutError(msg)
        out.append(tensor_layout_from_bhnc(t, heads_shard(desc, t.shape[1], slots_per_head=slots)))
    return tuple(out)


def sglang_mha_tensors(desc: CacheGroupDescription) -> tuple[TensorLayout, ...]:
    """SGLang K and V slot buffers ``[rows, H, D]``: region ``k`` or ``v`` per tensor, heads sharded."""
    out = []
    for t in desc.tensors:
        side = t.name.rsplit(".", 1)[-1]
        if side not in ("k", "v"):
            msg = f"SGLang MHA tensor {t.name!r} must be named '<layer>.k' or '<layer>.v'"
            raise LayoutError(msg)
        out.append(slot_rows_layout(t, desc.block_size, side, ("H", "C"), heads_shard(desc, t.shape[1])))
    return tuple(out)


class FlashAttnParser(LayoutParser):
    name = "flash_attn"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.kind != "attention":
            return None
        if desc.engine == "vllm" and desc.backend in STANDARD_BACKENDS:
            tensors = vllm_attention_tensors(desc)
            content = "kv-fused"
        elif desc.engine == "sglang" and desc.backend in SGLANG_POOLS and desc.layout in ("", "nhd"):
            tensors = sglang_mha_tensors(desc)
            content = "k,v"
        else:
            return None
        signature = layout_signature(desc.kind, content, desc.dtype, desc.block_size,
                                     cache_dtype=str(desc.extra.get("cache_dtype", "auto")))
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tensors, signature)
