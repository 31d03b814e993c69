"""Connector statistics: what vLLM logs as ``KV Transfer metrics`` and exports to Prometheus.

The scheduler side counts lookups, hits, pool use and chunk events (once per chunk, whatever the number of
ranks); each worker counts the bytes and seconds it copied (summed over ranks by vLLM).
vLLM aggregates the workers' objects with the scheduler's one (same class), ships them to the front-end
and calls :meth:`reduce` once per log interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

COUNTERS = (
    "lookup_requests", "lookup_tokens", "hit_tokens", "evictions",
    "stored_chunks", "stored_bytes", "store_seconds", "skipped_stores",
    "loaded_chunks", "loaded_bytes", "load_seconds",
    "persisted_chunks", "persist_failures", "prefetched_chunks", "prefetch_failures",
)
#: Per persistent tier, from its :class:`~kvoffload.tiers.base.TierStats`: stats name -> TierStats field.
TIER_FIELDS = {
    "hits": "hits", "misses": "misses", "writes": "writes", "read_bytes": "bytes_read",
    "written_bytes": "bytes_written", "read_seconds": "read_seconds", "write_seconds": "write_seconds",
    "skipped_writes": "skipped_writes", "evictions": "evictions", "errors": "errors", "corrupt": "corrupt",
}
TIERS = ("disk", "redis")
COUNTERS += tuple(f"{tier}_{name}" for tier in TIERS for name in TIER_FIELDS)
GAUGES = ("pool_used_bytes", "pool_bytes")


@dataclass
class KVOffloadStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        self.data[name] = value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVOffloadStats":
        for name, value in other.data.items():
            if name in GAUGES:
                self.data[name] = max(self.data.get(name, 0), value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {
            "hit_tokens": int(d.get("hit_tokens", 0)),
            "lookup_tokens": int(d.get("lookup_tokens", 0)),
            "hit_rate": round(d.get("hit_tokens", 0) / d["lookup_tokens"], 3) if d.get("lookup_tokens") else 0.0,
            "stored_GB": round(d.get("stored_bytes", 0) / 1e9, 3),
            "loaded_GB": round(d.get("loaded_bytes", 0) / 1e9, 3),
            "store_GBps": _gbps(d.get("stored_bytes", 0), d.get("store_seconds", 0)),
            "load_GBps": _gbps(d.get("loaded_bytes", 0), d.get("load_seconds", 0)),
            "skipped_stores": int(d.get("skipped_stores", 0)),
            "evictions": int(d.get("evictions", 0)),
            "pool_used_GB": round(d.get("pool_used_bytes", 0) / 1e9, 3),
        }
        for name in ("persisted_chunks", "persist_failures", "prefetched_chunks", "prefetch_failures"):
            if d.get(name):
                out[name] = int(d[name])
        for tier in TIERS:  # only the tiers in use, so a CPU-only setup logs what it did before
            if not any(d.get(f"{tier}_{name}") for name in TIER_FIELDS):
                continue
            out[f"{tier}_hits"] = int(d.get(f"{tier}_hits", 0))
            out[f"{tier}_read_GB"] = round(d.get(f"{tier}_read_bytes", 0) / 1e9, 3)
            out[f"{tier}_read_GBps"] = _gbps(d.get(f"{tier}_read_bytes", 0), d.get(f"{tier}_read_seconds", 0))
            out[f"{tier}_written_GB"] = round(d.get(f"{tier}_written_bytes", 0) / 1e9, 3)
            out[f"{tier}_write_GBps"] = _gbps(d.get(f"{tier}_written_bytes", 0), d.get(f"{tier}_write_seconds", 0))
            for name in ("skipped_writes", "evictions", "errors", "corrupt"):
                out[f"{tier}_{name}"] = int(d.get(f"{tier}_{name}", 0))
        return out


def _gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0


class KVOffloadPromMetrics(KVConnectorPromMetrics):
    """``kvoffload:*`` Prometheus counters and gauges, labelled like vLLM's own engine metrics."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        def per_engine(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

        self._counters = {
            name: per_engine(self._counter_cls(name=f"kvoffload:{name}", documentation=f"kvoffload {name}",
                                               labelnames=labelnames))
            for name in COUNTERS
        }
        self._gauges = {
            name: per_engine(self._gauge_cls(name=f"kvoffload:{name}", documentation=f"kvoffload {name}",
                                             labelnames=labelnames, multiprocess_mode="mostrecent"))
            for name in GAUGES
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, metric in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                metric[engine_idx].inc(value)
        for name, metric in self._gauges.items():
            if name in transfer_stats_data:
                metric[engine_idx].set(transfer_stats_data[name])
