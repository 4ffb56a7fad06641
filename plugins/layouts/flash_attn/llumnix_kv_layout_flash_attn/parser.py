"""Parser for vLLM's standard attention pages.

vLLM 0.32 hands every attention layer over as a ``[B, H, N, C]`` view into one
int8 pool, C = (head_size + head_size_v) elements holding K then V. The memory
order of B/H/N is the model-wide KVCacheLayout (LBNHC, LBHNC, ...); every offset
here comes from the view's own strides.
"""

from __future__ import annotations

from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import tensor_layout_from_bhnc

STANDARD_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHINFER", "ROCM_ATTN",
                               "ROCM_AITER_FA", "ROCM_AITER_UNIFIED_ATTN"})


class FlashAttnParser(LayoutParser):
    name = "flash_attn"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.engine != "vllm" or desc.kind != "attention" or desc.backend not in STANDARD_BACKENDS:
            return None
        tensors = tuple(tensor_layout_from_bhnc(t) for t in desc.tensors)
        signature = {
            "parser": self.name,
            "kind": desc.kind,
            "layout": desc.layout,
            "dtype": desc.dtype,
            "block_size": desc.block_size,
            "page": [list(t.logical) for t in tensors[:1]],
        }
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tensors, signature)
