"""Helpers for parsers of token-slot pools (SGLang): a page of ``page_size`` slot rows is one block.

SGLang's pools are per-layer tensors indexed by token slot (``[rows, heads, dim]``) or by
page (``[pages, ...]``); slot 0 / page 0 is padding. A layout parser turns such a tensor into
a :class:`~llumnix_kv_core.layout.TensorLayout` whose block ``b`` is page ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llumnix_kv_core.errors import LayoutError
from llumnix_kv_core.layout import Dim
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import Shard
from llumnix_kv_core.layout import TensorDescription
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.layout import tensor_layout_from_regions


def slot_rows_layout(t: TensorDescription, page_size: int, region: str, dims: Sequence[str],
                     shard: Shard | None = None) -> TensorLayout:
    """A ``[rows, d1, ..., dk]`` slot-indexed tensor (last dim contiguous) as pages of ``page_size`` rows.

    ``dims`` names d1..dk (the last is the content dim); the row dim becomes dim ``N``.
    """
    if len(t.shape) != len(dims) + 1:
        msg = f"tensor {t.name!r} has shape {t.shape}; expected [rows, {', '.join(dims)}]"
        raise LayoutError(msg)
    if t.strides[-1] != t.itemsize:
        msg = f"tensor {t.name!r}: the last dim has stride {t.strides[-1]} bytes, not {t.itemsize}"
        raise LayoutError(msg)
    rows = t.shape[0]
    if rows % page_size:
        msg = f"tensor {t.name!r} has {rows} rows, not a multiple of the page size {page_size}"
        raise LayoutError(msg)
    row = t.strides[0]
    reg = Region(region, 0, t.itemsize, (Dim("N", page_size, row),
                                         *(Dim(n, s, st) for n, s, st in zip(dims, t.shape[1:], t.strides[1:]))),
                 shard)
    return tensor_layout_from_regions(t.name, t.addr, rows // page_size, page_size * row, [reg])


def paged_layout(t: TensorDescription, region: str, dims: Sequence[str], shard: Shard | None = None,
                 itemsize: int | None = None) -> TensorLayout:
    """A ``[pages, d1, ..., dk]`` page-indexed tensor; ``itemsize`` overrides the element size."""
    if len(t.shape) != len(dims) + 1:
        msg = f"tensor {t.name!r} has shape {t.shape}; expected [pages, {', '.join(dims)}]"
        raise LayoutError(msg)
    isz = itemsize or t.itemsize
    reg = Region(region, 0, isz, tuple(Dim(n, s, st) for n, s, st in zip(dims, t.shape[1:], t.strides[1:])), shard)
    return tensor_layout_from_regions(t.name, t.addr, t.shape[0], t.strides[0], [reg])
