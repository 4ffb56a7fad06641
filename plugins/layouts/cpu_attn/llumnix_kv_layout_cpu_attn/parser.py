"""Parser for vLLM's CPU attention backend.

CPU_ATTN registers ``[B, H, N, 2*D]`` tensors (LBHNC) but the kernel re-packs each
(block, head) as a K tile then a V tile in an ISA-specific order (vec, vec16, amx,
neon, ...). The bytes have no per-token meaning, so a page is moved as whole
(block, head) units, and only between hosts that pack with the same ISA: the ISA
is part of the signature both sides compare at handshake, and a mismatch is refused there
with an error naming both ISAs. The heads dim is split over TP (whole head tiles move).
"""

from __future__ import annotations

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import Dim
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import heads_shard
from llumnix_kv_core.layout import layout_signature
from llumnix_kv_core.layout import tensor_layout_from_bhnc


def _per_head_units(t: TensorLayout, head_stride: int, shard: Shard) -> TensorLayout:
    heads, tokens, content = t.logical
    unit = tokens * content
    offsets = tuple(h * head_stride for h in range(heads))
    extent = (t.num_blocks - 1) * t.block_stride + offsets[-1] + unit if t.num_blocks else 0
    # One opaque tile per (block, head): its bytes have no per-token meaning.
    region = Region("packed", 0, 1, (Dim("H", heads, head_stride), Dim("X", unit, 1)), shard)
    return TensorLayout(t.name, t.addr, t.num_blocks, t.block_stride, offsets, unit, extent, t.logical, t.order,
                        (region,))


class CpuAttnParser(LayoutParser):
    name = "cpu_attn"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.engine != "vllm" or desc.backend != "CPU_ATTN":
            return None
        isa = desc.extra.get("isa")
        if not isa:
            msg = "CPU_ATTN cache description lacks the attention ISA; the engine adapter must report it"
            raise LayoutError(msg)
        tensors = []
        for d in desc.tensors:
            t = tensor_layout_from_bhnc(d)
            heads, tokens, _content = t.logical
            if d.strides[2] * tokens != d.strides[1] and heads > 1:
                msg = f"CPU_ATTN tensor {d.name!r} is not head-major (LBHNC); got strides {d.strides}"
                raise LayoutError(msg)
            tensors.append(_per_head_units(t, d.strides[1], heads_shard(desc, heads)))
        signature = layout_signature(desc.kind, "cpu-packed", desc.dtype, desc.block_size, isa=isa,
                                     head_size=desc.extra.get("head_size"))
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tuple(tensors), signature)
