"""The engine's configuration and one vLLM instance's geometry, validated on construction."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

# Per direction and per device: the save path and the load path each hold one staging buffer
# of this size, split in two halves so that gathering chunk k+1 overlaps the DMA of chunk k.
# Profiled on the H200 (2026-11-27, torch.profiler): issuing one chunk (gather launch, DMA,
# events) costs the host ~0.35-0.45 ms, and the save and load threads take turns under the
# GIL; with 16 MiB halves (0.3 ms of DMA) the copy engines idled between chunks and saves
# and loads at once ran one after the other. A 64 MiB half carries ~1.2 ms of DMA, more
# than both directions' issue cost, and its gather is still a ~35 us SM burst.
DEFAULT_STAGING_BYTES = 128 << 20
# Threads that first-touch the pool: page faults are per-core work, 16 cores on the GPU host.
DEFAULT_PIN_THREADS = min(16, os.cpu_count() or 1)
# "staged": gather into GPU staging, then DMA; "dma": saves by the copy engines alone (one 2D
# copy per block, beside loads too), and loads of up to DMA_LOAD_MAX_CHUNKS staging chunks by the
# copy engines too, longer ones staged; "auto": "dma" where a block's rows are at least
# DMA_MIN_ROW_BYTES wide, else "staged"; "zero_copy": kernels read and write the pinned
# pool directly. Measured on the H200 (2026-11-27), 512 scattered blocks per copy, 2D DMA against one
# contiguous copy: 0.92 with 64 KiB rows, 0.95 with 72 KiB (MLA), 0.86 with 32 KiB, 0.69-0.78
# with 8-16 KiB; staged reaches 0.97-0.99 at every size, but its gathers take the GPU from the
# model's process in time slices (a co-running matmul kept 0.86 of its rate).
SAVE_MODES = ("staged", "dma", "auto", "zero_copy")
DMA_MIN_ROW_BYTES = 64 << 10
# vLLM's default block hash (sha256) is 32 bytes; xxhash variants are 8 or 16.
DEFAULT_HASH_BYTES = 32


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How big the pool is, which GPUs it serves, and how transfers run.

    ``devices=()`` is CPU mode: plain memory and the torch reference copies, no CUDA at all.
    """

    pool_bytes: int
    devices: tuple[int, ...] = ()
    staging_bytes: int = DEFAULT_STAGING_BYTES
    write_timeout_s: float = 30.0
    save_mode: str = "staged"
    pin_threads: int = DEFAULT_PIN_THREADS
    # Queries through numba-compiled hash sets (when numba imports), not per-hash dict lookups.
    compiled_index: bool = True

    def __post_init__(self) -> None:
        _check_int("pool_bytes", self.pool_bytes, 1)
        if not isinstance(self.devices, tuple):
            raise ValueError(f"devices must be a tuple of ints, got {self.devices!r}")
        for d in self.devices:
            _check_int("devices[]", d, 0)
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices holds a duplicate: {self.devices!r}")
        _check_int("staging_bytes", self.staging_bytes, 2)
        if not isinstance(self.write_timeout_s, (int, float)) or not self.write_timeout_s > 0:
            raise ValueError(f"write_timeout_s must be > 0, got {self.write_timeout_s!r}")
        if self.save_mode not in SAVE_MODES:
            raise ValueError(f"save_mode must be one of {SAVE_MODES}, got {self.save_mode!r}")
        _check_int("pin_threads", self.pin_threads, 1)

    @property
    def dma_min_row(self) -> int | None:
        """Saves go by DMA alone when a block's rows are at least this wide (None: never)."""
        return {"dma": 0, "auto": DMA_MIN_ROW_BYTES}.get(self.save_mode)


@dataclass(frozen=True)
class InstanceSpec:
    """One vLLM instance's KV geometry: what one block of one rank looks like.

    ``page_bytes`` are one rank's region page sizes in region order; a block of one rank is
    those pages back to back (``block_bytes``), which is also its slot size in the pool.
    ``replicated`` (MLA): every rank holds identical pages, so the block is stored once and
    rank 0's copy serves all ranks.
    """

    instance_id: str
    model: str
    kv_dtype: str
    layout: str
    block_size: int
    page_bytes: tuple[int, ...]
    tp_size: int = 1
    replicated: bool = False
    hash_bytes: int = DEFAULT_HASH_BYTES

    def __post_init__(self) -> None:
        for name in ("instance_id", "model", "kv_dtype", "layout"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        _check_int("block_size", self.block_size, 1)
        if not isinstance(self.page_bytes, tuple) or not self.page_bytes:
            raise ValueError(f"page_bytes must be a non-empty tuple of ints, got {self.page_bytes!r}")
        for p in self.page_bytes:
            _check_int("page_bytes[]", p, 1)
        _check_int("tp_size", self.tp_size, 1)
        if not isinstance(self.replicated, bool):
            raise ValueError(f"replicated must be a bool, got {self.replicated!r}")
        _check_int("hash_bytes", self.hash_bytes, 1)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one rank: the slot size."""
        return sum(self.page_bytes)

    @property
    def stored_ranks(self) -> int:
        """How many slots one block takes: 1 if replicated, else ``tp_size``."""
        return 1 if self.replicated else self.tp_size

    @property
    def namespace(self) -> str:
        """A fingerprint of everything but ``instance_id``.

        Two instances of the same model and geometry share blocks; two models, dtypes,
        layouts, block sizes, page geometries or TP layouts never do.
        """
        fields = {
            "model": self.model,
            "kv_dtype": self.kv_dtype,
            "layout": self.layout,
            "block_size": self.block_size,
            "page_bytes": list(self.page_bytes),
            "tp_size": self.tp_size,
            "replicated": self.replicated,
            "hash_bytes": self.hash_bytes,
        }
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.model}@{digest[:16]}"
