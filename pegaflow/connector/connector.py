"""``PegaKVConnector``: vLLM 0.33's v1 KV connector API, handed to the scheduler side or the
worker side. Nothing here decides anything; see ``scheduler_side`` and ``worker_side``.

Load it with ``kv_connector="PegaKVConnector"``, ``kv_connector_module_path="pegaflow.connector"``,
``kv_role="kv_both"`` and ``kv_load_failure_policy="recompute"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import EngineLink
from pegaflow.connector.metadata import PegaConnectorMetadata, PegaWorkerMetadata
from pegaflow.connector.scheduler_side import ConnectorScheduler
from pegaflow.connector.stats import PegaKVConnectorStats, PegaPromMetrics
from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats, PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# Bytes of one block hash per vLLM prefix_caching_hash_algo (sha256: 32; xxh3-128: 16).
_HASH_BYTES = {"sha256": 32, "sha256_cbor": 32, "xxhash": 16, "xxhash_cbor": 16}


class BlockPoolPinner:
    """Pins GPU blocks through vLLM's block pool: a pinned block is not reallocated."""

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool

    def pin(self, block_ids: Sequence[int]) -> None:
        self._pool.touch([self._pool.blocks[i] for i in block_ids])

    def unpin(self, block_ids: Sequence[int]) -> None:
        self._pool.free_blocks([self._pool.blocks[i] for i in block_ids])


def instance_geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: ConnectorSettings) -> InstanceGeometry:
    """The instance's namespace fields, from vLLM's resolved configuration."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
    dtypes = sorted({str(getattr(s, "dtype", "?")).removeprefix("torch.") for s in specs})
    is_mla = bool(specs) and all(isinstance(s, MLAAttentionSpec) for s in specs)
    # MLA pages are identical on every TP rank; across pipeline or context-parallel ranks
    # they are not (other layers, other tokens), so those keep one copy per rank.
    replicated = is_mla and parallel.pipeline_parallel_size == 1 and parallel.prefill_context_parallel_size == 1
    return InstanceGeometry(
        instance_id=settings.instance_id,
        model=settings.namespace or str(vllm_config.model_config.model),
        kv_dtype=f"{cache.cache_dtype}:{'+'.join(dtypes)}",
        layout=str(kv_cache_config.kv_cache_layout or cache.kv_cache_layout or "LBNHC"),
        block_size=int(cache.block_size),
        tp_size=int(parallel.world_size),
        replicated=replicated,
        hash_bytes=_HASH_BYTES.get(str(cache.prefix_caching_hash_algo), 32),
    )


class PegaKVConnector(KVConnectorBase_V1):
    """vLLM's KV connector for a PegaFlow server: a best-effort cache of KV blocks in host memory."""

    _cache_hit_source = CacheHitSource.HOST

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache, not a hand-off: a dropped save is only a future miss.
        return False

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """False: the server holds the KV cache by CUDA IPC, which sleep mode's memory (cuMem)
        cannot be shared through and which a sleep would free under it. vLLM then refuses the
        combination at start-up instead of failing later."""
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings.from_extra_config(
            transfer.kv_connector_extra_config, engine_id=transfer.engine_id
        )
        if transfer.kv_load_failure_policy != "recompute":
            logger.warning(
                "PegaKVConnector: kv_load_failure_policy is %r; set \"recompute\" so that a lost "
                "cache entry is recomputed instead of failing the request",
                transfer.kv_load_failure_policy,
            )
        parallel = vllm_config.parallel_config
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ConnectorScheduler(
                self._settings,
                block_size=int(kv_cache_config.hash_block_size or vllm_config.cache_config.block_size),
                world_size=int(parallel.world_size),
                link=EngineLink(self._settings, "scheduler"),
            )
        else:
            rank = int(parallel.rank) % int(parallel.world_size)
            self._worker = ConnectorWorker(
                self._settings,
                EngineLink(self._settings, f"worker rank {rank}"),
                instance_geometry(vllm_config, kv_cache_config, self._settings),
                rank=rank,
            )
        logger.info(
            "PegaKVConnector %s: instance %s, server %s", role.name, self._settings.instance_id, self._settings.endpoint
        )

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is not None:
            self._worker.register_kv_caches(kv_caches, self._kv_cache_config)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, PegaConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._worker.bind(connector_metadata)  # type: ignore[arg-type]

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.clear()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole-request and asynchronous: nothing to wait for per layer."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Saves are per step, started in ``wait_for_save``: nothing per layer."""

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self._worker is None:
            return KVConnectorTransferResults()
        finished, failed = self._worker.take_transfer_results()
        return KVConnectorTransferResults(finished_recving=finished, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Loads finished since the last call (saves are reported through worker metadata).
        ``get_transfer_results`` is the complete form, with failures; vLLM 0.33 calls that."""
        results = self.get_transfer_results(finished_req_ids)
        return None, results.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Failed loads are reported per request in ``failed_recving`` (which vLLM also
        supports for multi-group caches), so no block ids are reported here."""
        return set()

    def build_connector_worker_meta(self) -> PegaWorkerMetadata | None:
        return self._worker.take_worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.link.close()

    # ---- scheduler side ----------------------------------------------------------------------

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        if self._scheduler is not None:
            self._scheduler.pinner = BlockPoolPinner(gpu_block_pool)

    def on_new_request(self, request: Request) -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self._scheduler is None:
            return
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self._scheduler is None:
            return PegaConnectorMetadata()  # type: ignore[return-value]
        return self._scheduler.build_connector_meta(scheduler_output)  # type: ignore[return-value]

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is None:
            return
        meta = connector_output.kv_connector_worker_meta
        self._scheduler.update_connector_output(
            connector_output.finished_recving,
            connector_output.failed_recving,
            meta if isinstance(meta, PegaWorkerMetadata) else None,
        )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return self._scheduler.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        # Keep the engine stepping until every save has reported, so pinned blocks come back;
        # not while the server is unreachable (the deadline will free them at a later step,
        # and an idle engine must not spin on empty steps for that long).
        scheduler = self._scheduler
        return scheduler is not None and scheduler.has_pending_saves() and not scheduler.link.gate.down

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is None:
            return None
        return PegaKVConnectorStats(data=scheduler.take_counters())

    def reset_cache(self) -> bool | None:
        """Drops the instance's namespace from PegaFlow's pool (and the failed-load bans);
        False when the server could not be reached or refused."""
        if self._scheduler is None:
            return None
        return self._scheduler.reset()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PegaKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> PegaPromMetrics:
        return PegaPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
