"""The layer table both sides exchange at handshake: one memory region per cache tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.errors import IncompatiblePeerError
from llumnix_kv_core.layout import KVLayout
from llumnix_kv_core.layout import Region
from llumnix_kv_core.layout import TensorLayout
from llumnix_kv_core.memory import MemoryRegion
from llumnix_kv_core.memory import MemoryRegistry


@dataclass(frozen=True)
class LayerEntry:
    """One cache tensor: its memory region id, its cache group and its block geometry."""

    name: str
    region_id: int
    group_id: int
    tensor: TensorLayout


class LayerTable:
    """Layers of every cache group, with region ids assigned in name order (equal on both sides)."""

    def __init__(self, layouts: list[KVLayout]) -> None:
        tensors = [(t.name, lay.group_id, t) for lay in layouts for t in lay.tensors]
        tensors.sort(key=lambda x: x[0])
        self.entries = {name: LayerEntry(name, i, gid, t) for i, (name, gid, t) in enumerate(tensors)}
        self.group_ids = sorted({lay.group_id for lay in layouts})

    def __getitem__(self, name: str) -> LayerEntry:
        return self.entries[name]

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def locate(self, region_id: int, offset: int) -> str:
        """Which layer and block the byte at ``offset`` of region ``region_id`` belongs to, in words."""
        e = next((x for x in self.entries.values() if x.region_id == region_id), None)
        if e is None:
            return f"region {region_id} is no layer of this side"
        t = e.tensor
        for unit, start in enumerate(t.unit_offsets):
            block, within = divmod(offset - start, t.block_stride) if t.block_stride else (0, offset - start)
            if 0 <= block < t.num_blocks and 0 <= within < t.unit_bytes:
                return f"layer {e.name!r}, block {block}, unit {unit}, byte {within}"
        return f"layer {e.name!r}, offset {offset} (outside its blocks)"

    def register(self, memory: MemoryRegistry, device: str = "cpu") -> None:
        for e in self.entries.values():
            memory.register(MemoryRegion(e.region_id, e.tensor.addr, e.tensor.extent, device))

    def describe(self) -> list[dict[str, Any]]:
        """The table as sent in HELLO: geometry only, addresses stay private."""
        return [
            {
                "name": e.name,
                "region": e.region_id,
                "group": e.group_id,
                "num_blocks": e.tensor.num_blocks,
                "block_stride": e.tensor.block_stride,
                "unit_offsets": list(e.tensor.unit_offsets),
                "unit_bytes": e.tensor.unit_bytes,
                "logical": list(e.tensor.logical),
                "order": e.tensor.order,
                "regions": [r.to_json() for r in e.tensor.regions],
            }
            for e in self.entries.values()
        ]


def remote_layers(described: list[dict[str, Any]], local: LayerTable) -> dict[str, LayerEntry]:
    """Parse a peer's layer table; each layer must exist here, in the same cache group.

    Layers described by regions are checked later, when the plan compiler pairs them; layers
    without regions (opaque units) must have the same block geometry here and there.
    """
    out: dict[str, LayerEntry] = {}
    for d in described:
        t = TensorLayout(
            name=str(d["name"]),
            addr=0,
            num_blocks=int(d["num_blocks"]),
            block_stride=int(d["block_stride"]),
            unit_offsets=tuple(int(x) for x in d["unit_offsets"]),
            unit_bytes=int(d["unit_bytes"]),
            extent=0,
            logical=tuple(int(x) for x in d["logical"]),
            order=str(d.get("order", "")),
            regions=tuple(Region.from_json(r) for r in d.get("regions", ())),
        )
        out[t.name] = LayerEntry(t.name, int(d["region"]), int(d["group"]), t)
    missing = sorted(set(local.entries) - set(out))
    extra = sorted(set(out) - set(local.entries))
    if missing or extra:
        msg = (
            f"the peer's cache layers differ from this side's (missing on peer: {missing[:4]}, "
            f"unknown here: {extra[:4]}); both instances must serve the same model"
        )
        raise IncompatiblePeerError(msg)
    for name, e in out.items():
        mine = local[name]
        if e.group_id != mine.group_id:
            msg = f"layer {name!r} is in cache group {mine.group_id} here and {e.group_id} on the peer"
            raise IncompatiblePeerError(msg)
        # With regions on both sides the plan compiler decides (other TP size, other memory order).
        if (not e.tensor.regions or not mine.tensor.regions) and e.tensor.geometry() != mine.tensor.geometry():
            msg = (
                f"layer {name!r}: block geometry here {mine.tensor.geometry()} vs peer "
                f"{e.tensor.geometry()}; use the same KV layout, block size and dtype on both sides"
            )
            raise IncompatiblePeerError(msg)
    return out
