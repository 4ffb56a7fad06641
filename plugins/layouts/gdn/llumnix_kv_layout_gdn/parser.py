"""Parser for Gated DeltaNet (GDN) linear-attention state caches.

vLLM (``MambaSpec``, mamba type GDN_ATTN): each layer is a ``[B, 1, 1, page]`` int8 view; a
block is one *state slot* holding the states back to back in ``get_state_shape()`` order:

* the conv state, ``(state_len, conv_dim/tp)`` in SD layout (the default) or
  ``(conv_dim/tp, state_len)`` in DS layout (``VLLM_SSM_CONV_STATE_LAYOUT``), where
  ``conv_dim = 2 * key_dim + value_dim`` is laid out Q | K | V and each of the three is split
  over TP on its own (a rank holds its slice of Q, of K and of V);
* the temporal (recurrent) state ``(num_v_heads/tp, head_v_dim, head_k_dim)``, split by value heads.

Pages are padded to the attention page size of hybrid models (the block stride is the real
one). SGLang's ``MambaPool`` keeps per layer ``[slots, conv_dim/tp, state_len]`` (DS) and
``[slots, num_v_heads/tp, head_v_dim, head_k_dim]`` tensors, named ``<layer>.conv`` and
``<layer>.ssm``. Block ids name state slots, not tokens: only the last valid state block of a
request moves, once its prefill is complete (``moves = "last_state"``).

The description's ``extra`` carries ``shapes`` (per-rank state shapes), ``itemsizes``,
``dtypes``, ``conv_layout`` ("SD"/"DS") and ``tp_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.interfaces.layout import LayoutParser
from llumnix_kv_core.layout import MOVES_LAST_STATE
from llumnix_kv_core.layout import CacheGroupDescription
from llumnix_kv_core.layout import Dim
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import layout_signature
from llumnix_kv_core.layout import tensor_layout_from_regions

GDN_TYPES = frozenset({"gdn_attn", "GDN_ATTN"})


def gdn_regions(conv_shape: Sequence[int], ssm_shape: Sequence[int], itemsizes: Sequence[int], conv_layout: str,
                tp: int, conv_offset: int = 0, ssm_offset: int | None = None) -> tuple[Region, Region]:
    """Conv and temporal state regions of one GDN state slot (per-rank shapes, row-major)."""
    if len(conv_shape) != 2 or len(ssm_shape) != 3:
        msg = f"GDN state shapes {tuple(conv_shape)}, {tuple(ssm_shape)}: expected a 2-D conv and a 3-D temporal"
        raise LayoutError(msg)
    ci, si = itemsizes
    nv, hv, hk = ssm_shape
    if conv_layout == "DS":
        conv_dim, state_len = conv_shape
        conv_dims = (Dim("D", conv_dim, state_len * ci), Dim("S", state_len, ci))
    elif conv_layout == "SD":
        state_len, conv_dim = conv_shape
        conv_dims = (Dim("S", state_len, conv_dim * ci), Dim("D", conv_dim, ci))
    else:
        msg = f"unknown GDN conv state layout {conv_layout!r} (expected 'SD' or 'DS')"
        raise LayoutError(msg)
    value = nv * hv
    if conv_dim <= value or (conv_dim - value) % 2:
        msg = f"GDN conv dim {conv_dim} does not split into Q|K|V with value dim {value} (= {nv} heads x {hv})"
        raise LayoutError(msg)
    key = (conv_dim - value) // 2
    conv = Region("conv", conv_offset, ci, conv_dims, Shard("D", (key * tp, key * tp, value * tp)))
    if ssm_offset is None:
        ssm_offset = conv_offset + conv_dim * state_len * ci
    ssm = Region("ssm", ssm_offset, si, (Dim("H", nv, hv * hk * si), Dim("V", hv, hk * si), Dim("K", hk, si)),
                 Shard("H", (nv * tp,)))
    return conv, ssm


class GdnParser(LayoutParser):
    name = "gdn"

    def parse(self, desc: CacheGroupDescription) -> KVLayout | None:
        if desc.kind != "mamba" or str(desc.extra.get("mamba_type", "")) not in GDN_TYPES:
            return None
        shapes = [tuple(int(x) for x in s) for s in desc.extra.get("shapes", ())]
        itemsizes = [int(x) for x in desc.extra.get("itemsizes", ())]
        if len(shapes) != 2 or len(itemsizes) != 2:
            msg = (f"GDN cache group {desc.group_id}: expected two states (conv, temporal) with their element "
                   f"sizes, got shapes {shapes} and element sizes {itemsizes}")
            raise LayoutError(msg)
        tp = int(desc.extra.get("tp_size", 1) or 1)
        layout = str(desc.extra.get("conv_layout", "SD"))
        tensors: list[TensorLayout] = []
        if desc.engine == "vllm":
            conv, ssm = gdn_regions(shapes[0], shapes[1], itemsizes, layout, tp)
            for t in desc.tensors:
                page = ssm.offset + ssm.nbytes
                if len(t.shape) != 4 or t.shape[3] * t.itemsize < page or t.strides[3] != t.itemsize:
                    msg = f"GDN tensor {t.name!r} ({t.shape}) cannot hold the {page}-byte state page"
                    raise LayoutError(msg)
                tensors.append(tensor_layout_from_regions(t.name, t.addr, t.shape[0], t.strides[0], (conv, ssm)))
        elif desc.engine == "sglang" and desc.backend == "MambaPool":
            conv, ssm = gdn_regions(shapes[0], shapes[1], itemsizes, "DS", tp, 0, 0)
            for t in desc.tensors:
                reg = conv if t.name.endswith(".conv") else ssm if t.name.endswith(".ssm") else None
                if reg is None:
                    msg = f"SGLang Mamba tensor {t.name!r} must be named '<layer>.conv' or '<layer>.ssm'"
                    raise LayoutError(msg)
                tensors.append(tensor_layout_from_regions(t.name, t.addr, t.shape[0], t.strides[0], (reg,)))
        else:
            return None
        key, _, value = conv.shard.groups if conv.shard else (0, 0, 0)
        signature = layout_signature(
            desc.kind, "gdn", str(desc.extra.get("dtypes", desc.dtype)), desc.block_size,
            state_len=conv.dim("S").size, key_dim=key, value_dim=value, num_v_heads=ssm.shard.groups[0],
            head_v_dim=ssm.dim("V").size, head_k_dim=ssm.dim("K").size)
        return KVLayout(self.name, desc.group_id, desc.kind, desc.block_size, tuple(tensors), signature,
                        moves=MOVES_LAST_STATE, detail={"conv_layout": layout})
