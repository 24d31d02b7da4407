"""The engine: a pinned pool, a block index, and save/load transfers between them and vLLM's
KV caches. A plain in-process API, thread-safe; the server wraps it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pegaflow.engine.config import EngineConfig, InstanceSpec
from pegaflow.engine.handle import TransferHandle
from pegaflow.kernels import KVRegions

logger = logging.getLogger(__name__)


class Engine:
    """Owns the pool and the index; moves blocks with the copy kernels."""

    def __init__(self, config: EngineConfig) -> None:
        """Allocate (and in GPU mode pin) the pool; start the completion threads."""
        raise NotImplementedError

    def register_instance(self, spec: InstanceSpec) -> str:
        """Record an instance's geometry; returns its namespace.

        Registering the same spec again is fine; the same id with another spec is a ValueError.
        """
        raise NotImplementedError

    def register_kv(self, instance_id: str, rank: int, kv: KVRegions, device: int | None = None) -> None:
        """Register rank ``rank``'s KV cache regions (``kv.block_bytes`` must equal the spec's)."""
        raise NotImplementedError

    def unregister_kv(self, instance_id: str, rank: int) -> None:
        """Forget one rank's KV cache (after its in-flight copies)."""
        raise NotImplementedError

    def query(self, instance_id: str, hashes: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``hashes`` ready on every rank (rank 0 if replicated)."""
        raise NotImplementedError

    def save(
        self,
        instance_id: str,
        rank: int,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        after_event: Any = None,
    ) -> TransferHandle:
        """Copy blocks ``block_ids`` of the rank's KV cache into the pool under ``hashes``.

        The copy starts after ``after_event`` (a CUDA event recorded after the forward that
        wrote the blocks). Held blocks and blocks without room are skipped (``result.skipped``).
        """
        raise NotImplementedError

    def load(self, instance_id: str, rank: int, block_ids: Sequence[int], hashes: Sequence[bytes]) -> TransferHandle:
        """Copy the pool's blocks ``hashes`` into blocks ``block_ids`` of the rank's KV cache.

        A hash not held and ready makes the result ``ok=False`` with its index in ``missing``.
        """
        raise NotImplementedError

    def unregister(self, instance_id: str) -> None:
        """Forget an instance and release its pins; its stored blocks stay (they belong to the namespace)."""
        raise NotImplementedError

    def stats(self) -> dict[str, int | float]:
        """Counters: hits, misses, bytes_saved, bytes_loaded, evictions, skipped_saves, pool_used, pool_free, ..."""
        raise NotImplementedError

    def close(self) -> None:
        """Wait for in-flight transfers, stop the threads, unpin and free the pool."""
        raise NotImplementedError
