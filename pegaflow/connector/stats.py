"""Connector statistics as vLLM logs and exports them (``KVConnectorStats`` and Prometheus).

The payload is a flat ``{name: number}`` map (it crosses processes as a plain dict): counters
are summed when aggregated, gauges keep the latest value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

# name -> Prometheus help text; every counter the scheduler side counts.
COUNTERS: dict[str, str] = {
    "lookups": "Lookups of a request's block hashes in PegaFlow",
    "lookup_errors": "Lookups that were misses because the server did not answer",
    "lookup_hit_blocks": "Blocks PegaFlow held beyond the GPU prefix cache at lookup",
    "loads": "Loads sent to the workers",
    "load_blocks": "Blocks in the loads sent to the workers",
    "loads_failed": "Loads that failed on some worker (the request was recomputed)",
    "banned_hashes": "Block hashes no longer advertised after a failed load",
    "save_jobs": "Save jobs sent to the workers (one per step with full blocks)",
    "save_blocks": "Blocks in the save jobs sent",
    "save_blocks_done": "Blocks the server copied into its pool (summed over ranks)",
    "save_blocks_skipped": "Blocks the server did not copy: already held, or a full pool",
    "save_blocks_dropped": "Blocks not sent for saving while the server was unreachable",
    "saves_failed": "Save jobs a worker gave up (server unreachable or past the deadline)",
}
GAUGES: dict[str, str] = {
    "pinned_blocks": "GPU blocks held by the connector while saves read them",
}


@dataclass
class PegaKVConnectorStats(KVConnectorStats):
    """``data``: counter and gauge values by name (see ``COUNTERS`` and ``GAUGES``)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if name in GAUGES:
                self.data[name] = value
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS) and not self.data.get("pinned_blocks")


class PegaPromMetrics(KVConnectorPromMetrics):
    """``vllm:pegaflow_<counter>`` counters and ``vllm:pegaflow_<gauge>`` gauges per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}
        for name, doc in COUNTERS.items():
            self._metrics[name] = self._counter_cls(
                name=f"vllm:pegaflow_{name}", documentation=doc, labelnames=labelnames
            )
        for name, doc in GAUGES.items():
            self._metrics[name] = self._gauge_cls(
                name=f"vllm:pegaflow_{name}", documentation=doc, labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
        self._children: dict[tuple[int, str], Any] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            metric = self._metrics.get(name)
            if metric is None:
                continue
            child = self._children.get((engine_idx, name))
            if child is None:
                child = metric.labels(*self.per_engine_labelvalues[engine_idx])
                self._children[(engine_idx, name)] = child
            if name in GAUGES:
                child.set(value)
            elif value:
                child.inc(value)
