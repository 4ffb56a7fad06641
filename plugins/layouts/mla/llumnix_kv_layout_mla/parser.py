"""Parser for multi-head latent attention (MLA) caches.

vLLM registers each MLA layer as a ``[B, 1, N, C]`` view, C = kv_lora_rank + qk_rope_head_dim
elements (576 for DeepSeek; one latent vector per token, no separate V). SGLang's
``MLATokenToKVPool`` keeps ``[rows, 1, C]`` token slots per layer. The latent is the same on
every TP rank: one prefill rank sends, the others skip (see ``llumnix_kv_core.plan``).
"""

from __future__ import annotations

from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import layout_signature
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.pools import slot_rows_layout

MLA_BACKENDS = frozenset({"CPU_MLA", "AMX_MLA", "TRITON_MLA", "CUTLASS_MLA", "FLASHMLA", "FLASHINFER_MLA",
                          "FLASH_ATTN_MLA", "ROCM_AITER_MLA", "ROCM_AITER_TRITON_MLA", "TOKENSPEED_MLA"})


class MlaParser(LayoutParser):
    name = "mla"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.kind != "mla" or any(r != "latent" for r in dict(desc.extra.get("roles") or {}).values()):
            return None
        if desc.engine == "vllm" and desc.backend in MLA_BACKENDS:
            tensors = tuple(tensor_layout_from_bhnc(t, None, region="latent") for t in desc.tensors)
        elif desc.engine == "sglang" and desc.backend == "MLATokenToKVPool":
            tensors = tuple(slot_rows_layout(t, desc.block_size, "latent", ("H", "C")) for t in desc.tensors)
        else:
            return None
        latent = tensors[0].regions[0] if tensors else None
        signature = layout_signature(desc.kind, "mla-latent", desc.dtype, desc.block_size,
                                     cache_dtype=str(desc.extra.get("cache_dtype", "auto")),
                                     token_bytes=latent.dim("C").size * latent.itemsize if latent else 0)
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tensors, signature)
