"""The connector's numbers in vLLM's own logs and ``/metrics``.

Each worker turns the transfer records of its agent into a :class:`LlumnixKVStats` per step;
vLLM merges the workers' stats (``aggregate``), logs them periodically (``reduce``) and feeds
them to :class:`LlumnixPromMetrics`, which keeps Prometheus counters and histograms per engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from llumnix_kv_core.agent.records import TransferRecord

DIRECTIONS = ("load", "send")
# Series per direction: bytes and seconds of every transfer that ended well, counts of those that did not.
_SERIES = ("bytes", "seconds", "failed", "cancelled", "expired")


def _empty() -> dict[str, list[float]]:
    return {f"{d}_{s}": [] for d in DIRECTIONS for s in _SERIES}


@dataclass
class LlumnixKVStats(KVConnectorStats):
    """Per-transfer observations since the last report; serializable (plain lists in ``data``)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = _empty()

    def record(self, rec: TransferRecord) -> None:
        if rec.ok:
            self.data[f"{rec.direction}_bytes"].append(rec.nbytes)
            self.data[f"{rec.direction}_seconds"].append(rec.seconds)
        else:
            self.data[f"{rec.direction}_{rec.outcome}"].append(1)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, values in other.data.items():
            self.data.setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for d in DIRECTIONS:
            nbytes = np.asarray(self.data[f"{d}_bytes"], dtype=np.float64)
            secs = np.asarray(self.data[f"{d}_seconds"], dtype=np.float64)
            out[f"{d}s"] = len(nbytes)
            out[f"{d} MB"] = round(float(nbytes.sum()) / 2**20, 3)
            out[f"{d} avg ms"] = round(float(secs.mean()) * 1e3, 3) if len(secs) else 0
            out[f"{d} p90 ms"] = round(float(np.percentile(secs, 90)) * 1e3, 3) if len(secs) else 0
            for s in ("failed", "cancelled", "expired"):
                out[f"{d}s {s}"] = len(self.data[f"{d}_{s}"])
        return out


class LlumnixPromMetrics(KVConnectorPromMetrics):
    """``vllm:llumnix_kv_*``: bytes and transfers by direction and outcome, and transfer latency."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        labels = [*labelnames, "direction"]
        self._bytes = self._counter_cls(name="vllm:llumnix_kv_bytes", labelnames=labels,
                                        documentation="KV bytes moved by llumnix-kv transfers that completed.")
        self._transfers = self._counter_cls(name="vllm:llumnix_kv_transfers", labelnames=[*labels, "outcome"],
                                            documentation="llumnix-kv transfers by outcome (done/acked, failed, "
                                            "cancelled, expired).")
        self._seconds = self._histogram_cls(name="vllm:llumnix_kv_transfer_seconds", labelnames=labels,
                                            buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0],
                                            documentation="Duration of completed llumnix-kv transfers.")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self.per_engine_labelvalues[engine_idx]
        for d in DIRECTIONS:
            nbytes = transfer_stats_data.get(f"{d}_bytes", [])
            self._bytes.labels(*values, d).inc(sum(nbytes))
            hist = self._seconds.labels(*values, d)
            for s in transfer_stats_data.get(f"{d}_seconds", []):
                hist.observe(s)
            self._transfers.labels(*values, d, "done" if d == "load" else "acked").inc(len(nbytes))
            for outcome in ("failed", "cancelled", "expired"):
                n = len(transfer_stats_data.get(f"{d}_{outcome}", []))
                if n:
                    self._transfers.labels(*values, d, outcome).inc(n)
