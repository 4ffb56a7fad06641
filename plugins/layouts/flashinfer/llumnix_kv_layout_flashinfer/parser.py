"""Parser for FlashInfer paged KV caches.

vLLM's FLASHINFER backend takes the same ``[B, H, N, C]`` views as FLASH_ATTN (K|V fused
per cell); FlashInfer calls the memory order NHD (LBNHC/BLNHC: tokens outer, heads inner)
or HND (LBHNC/BLHNC/BHLNC: heads outer). NVFP4 caches have two head slots per KV head (K
slots then V slots, ``slots_per_head`` 2). SGLang's HND pool (``SGLANG_USE_HND_KVCACHE``) keeps
``[pages, H, page_size, D]`` K and V buffers per layer, named ``<layer>.k`` / ``<layer>.v``.

NHD and HND hold the same data: the plan compiler permutes between them during the copy.
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
from llumnix_kv_core.pools import paged_layout

VLLM_BACKENDS = frozenset({"FLASHINFER", "TRITON_FLASHINFER"})


def flashinfer_order(t: TensorLayout) -> str:
    """"NHD" when tokens are outer to heads in a block, else "HND" (one head: "NHD")."""
    reg = t.regions[0]
    h, n = reg.dim("H"), reg.dim("N")
    return "HND" if h.size > 1 and h.stride > n.stride else "NHD"


class FlashInferParser(LayoutParser):
    name = "flashinfer"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.kind != "attention":
            return None
        if desc.engine == "vllm" and desc.backend in VLLM_BACKENDS:
            slots = int(desc.extra.get("slots_per_head", 1) or 1)
            tensors = tuple(tensor_layout_from_bhnc(t, heads_shard(desc, t.shape[1], slots_per_head=slots))
                            for t in desc.tensors)
            content = "kv-fused"
        elif desc.engine == "sglang" and desc.backend == "MHATokenToKVPool" and desc.layout == "hnd":
            out = []
            for t in desc.tensors:
                side = t.name.rsplit(".", 1)[-1]
                if side not in ("k", "v"):
                    msg = f"SGLang MHA tensor {t.name!r} must be named '<layer>.k' or '<layer>.v'"
                    raise LayoutError(msg)
                if len(t.shape) != 4 or t.shape[2] != desc.block_size:
                    msg = f"SGLang HND tensor {t.name!r} has shape {t.shape}; expected [pages, H, page_size, D]"
                    raise LayoutError(msg)
                out.append(paged_layout(t, side, ("H", "N", "C"), heads_shard(desc, t.shape[1])))
            tensors = tuple(out)
            content = "k,v"
        else:
            return None
        orders = {flashinfer_order(t) for t in tensors}
        signature = layout_signature(desc.kind, content, desc.dtype, desc.block_size,
                                     cache_dtype=str(desc.extra.get("cache_dtype", "auto")))
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tensors, signature,
                        detail={"flashinfer_layout": "/".join(sorted(orders))})
