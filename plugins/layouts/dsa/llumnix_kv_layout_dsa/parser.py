"""Parser for DeepSeek-V3.2 sparse attention (DSA) caches: two tensors per layer.

* The MLA latent page: 656 bytes per token in ``fp8_ds_mla`` (512 fp8 NoPE values, four fp32
  scales, 64 bf16 RoPE values) or 576 bf16 elements; region ``latent`` with dims (H=1, N, C).
* The indexer page (``DeepseekV32IndexerCache``, vLLM's ``[B, 1, N, 132]`` uint8 view): **not**
  132 bytes per token: the block holds the fp8 keys of all N tokens first (128 bytes each),
  then their N fp32 scales. Regions ``index_k`` (N x 128 bytes at 0) and ``index_scale``
  (N fp32 at N*128), so a plan keeps every token's key and scale together whatever it moves.
  The kernel block size is 64 on CUDA.

vLLM puts both in one cache group (``UniformTypeKVCacheSpecs``); the description marks the
indexer tensors with ``extra["roles"][name] == "indexer"``. SGLang's ``DSATokenToKVPool`` keeps
``[rows, 1, 656]`` latent slots and ``[pages, page_size * 132]`` indexer pages per layer.
Everything is replicated over TP: one prefill rank sends.
"""

from __future__ import annotations

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import Dim
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import layout_signature
from llumnix_kv_core.layout import tensor_layout_from_bhnc
from llumnix_kv_core.layout import tensor_layout_from_regions
from llumnix_kv_core.pools import slot_rows_layout

SPARSE_BACKENDS = frozenset({"FLASHMLA_SPARSE", "FLASHINFER_MLA_SPARSE", "FLASHINFER_MLA_SPARSE_SM120",
                             "FLASHINFER_MLA_SPARSE_SM90", "ROCM_AITER_MLA_SPARSE", "XPU_MLA_SPARSE",
                             "FLASH_ATTN_MLA_SPARSE"})
SCALE_BYTES = 4  # one fp32 scale per token


def indexer_regions(tokens: int, token_bytes: int) -> tuple[Region, Region]:
    """Keys of all tokens first, then one fp32 scale per token."""
    key_bytes = token_bytes - SCALE_BYTES
    if key_bytes <= 0:
        msg = f"an indexer page of {token_bytes} bytes per token cannot hold fp8 keys and an fp32 scale"
        raise LayoutError(msg)
    keys = Region("index_k", 0, 1, (Dim("N", tokens, key_bytes), Dim("C", key_bytes, 1)))
    scales = Region("index_scale", tokens * key_bytes, SCALE_BYTES, (Dim("N", tokens, SCALE_BYTES),))
    return keys, scales


def vllm_indexer(t: TensorDescription) -> TensorLayout:
    if len(t.shape) != 4 or t.shape[1] != 1 or t.itemsize != 1:
        msg = f"indexer tensor {t.name!r} has shape {t.shape} (element size {t.itemsize}); expected uint8 [B, 1, N, C]"
        raise LayoutError(msg)
    b, _, n, c = t.shape
    if t.strides[3] != 1 or t.strides[2] != c:
        msg = f"indexer tensor {t.name!r}: a block's {n}x{c} bytes are not one contiguous page (strides {t.strides})"
        raise LayoutError(msg)
    return tensor_layout_from_regions(t.name, t.addr, b, t.strides[0], indexer_regions(n, c))


def sglang_indexer(t: TensorDescription, page: int) -> TensorLayout:
    if len(t.shape) != 2 or t.itemsize != 1 or t.shape[1] % page or t.strides[1] != 1:
        msg = f"SGLang indexer tensor {t.name!r} has shape {t.shape}; expected uint8 [pages, page_size * 132]"
        raise LayoutError(msg)
    return tensor_layout_from_regions(t.name, t.addr, t.shape[0], t.strides[0],
                                      indexer_regions(page, t.shape[1] // page))


class DsaParser(LayoutParser):
    name = "dsa"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        roles = dict(desc.extra.get("roles") or {})
        if desc.kind != "mla" or "indexer" not in roles.values():
            if not (desc.kind == "mla" and desc.backend in SPARSE_BACKENDS):
                return None
        tensors = []
        for t in desc.tensors:
            role = roles.get(t.name, "latent")
            if desc.engine == "vllm":
                tl = vllm_indexer(t) if role == "indexer" else tensor_layout_from_bhnc(t, None, region="latent")
            elif desc.engine == "sglang" and desc.backend == "DSATokenToKVPool":
                tl = (sglang_indexer(t, desc.block_size) if role == "indexer"
                      else slot_rows_layout(t, desc.block_size, "latent", ("H", "C")))
            else:
                return None
            tensors.append(tl)
        latent = next((t.regions[0] for t in tensors if t.regions[0].name == "latent"), None)
        index = next((t.regions for t in tensors if t.regions[0].name == "index_k"), None)
        if latent is None or index is None:
            msg = (f"DSA cache group {desc.group_id} needs latent and indexer tensors; roles given: "
                   f"{sorted(set(roles.values())) or 'none'}")
            raise LayoutError(msg)
        signature = layout_signature(
            desc.kind, "dsa", desc.dtype, desc.block_size, cache_dtype=str(desc.extra.get("cache_dtype", "auto")),
            latent_token_bytes=latent.dim("C").size * latent.itemsize,
            index_token_bytes=index[0].dim("C").size + SCALE_BYTES)
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tuple(tensors), signature)
