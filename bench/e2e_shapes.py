"""Model shapes, vLLM 0.33 KV caches with the ``kv_cache_config`` vLLM hands the connector,
and the deterministic block contents the end-to-end harness writes and checks.

The GPU machine has no vLLM: :class:`KVCacheTensor`, :class:`KVCacheGroupSpec`,
:class:`KVCacheConfig` and :class:`PageSpec` are stand-ins carrying the same fields as vLLM
0.33's classes of those names (``vllm/v1/kv_cache_interface.py``), which is all the
connector's worker side reads. The cache itself comes from ``pegaflow.kernels.layouts``,
which allocates it exactly as vLLM 0.33 does (one int8 buffer, per-layer views).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pegaflow.connector.worker_side import regions_from_kv_cache_config
from pegaflow.kernels import KVRegions, reference
from pegaflow.kernels.layouts import allocate_attention_kv_cache, allocate_mla_kv_cache

ATTENTION_LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")
LAYOUTS = ATTENTION_LAYOUTS + ("MLA",)
# Blocks written or checked per torch call: bounds the temporaries (64 x 2 MiB for Llama-3-8B).
CHUNK_BLOCKS = 64


@dataclass(frozen=True)
class Shape:
    """The KV geometry of a model (all ranks together)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Shape.{name} must be a positive int, got {value!r}")

    def block_bytes(self, layout: str, tp: int) -> int:
        """Bytes of one block of one rank."""
        item = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        if layout == "MLA":
            return self.num_layers * self.block_size * 576 * item
        return self.num_layers * (self.num_kv_heads // tp) * self.block_size * 2 * self.head_size * item


LLAMA3_8B = Shape("llama3-8b", num_layers=32, num_kv_heads=8, head_size=128, block_size=16)
SMOKE = Shape("smoke", num_layers=4, num_kv_heads=2, head_size=16, block_size=4)


# ---- stand-ins for vLLM 0.33's kv_cache_interface classes (same field names) -------------


@dataclass(frozen=True)
class KVCacheTensor:
    size: int
    layers: list[str]
    layer_stride: int
    block_stride: int
    offset: int = 0
    host_resident: bool = False


@dataclass(frozen=True)
class PageSpec:
    """The fields of vLLM's ``AttentionSpec`` / ``MLAAttentionSpec`` the connector reads."""

    block_size: int
    page_size_bytes: int
    has_layer_views: bool = True


@dataclass(frozen=True)
class KVCacheGroupSpec:
    layer_names: list[str]
    kv_cache_spec: PageSpec


@dataclass(frozen=True)
class KVCacheConfig:
    num_blocks: int
    kv_cache_tensors: list[KVCacheTensor]
    kv_cache_groups: list[KVCacheGroupSpec]
    kv_cache_layout: str | None = None

    def num_blocks_of(self, tensor: KVCacheTensor) -> int:
        return self.num_blocks


@dataclass(frozen=True)
class RankCache:
    """One rank's KV cache: what vLLM passes to ``register_kv_caches``, and its regions."""

    kv_caches: dict[str, torch.Tensor] = field(repr=False)
    kv_cache_config: KVCacheConfig = field(repr=False)
    regions: KVRegions = field(repr=False)
    buffer: torch.Tensor = field(repr=False)


def build_rank_cache(shape: Shape, layout: str, num_blocks: int, tp: int, device: str | torch.device) -> RankCache:
    """Allocate one rank's cache as vLLM 0.33 does; regions derived as the connector derives them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "MLA" and shape.num_kv_heads % tp:
        raise ValueError(f"{shape.num_kv_heads} KV heads do not split over tp={tp}")
    if layout == "MLA":
        built = allocate_mla_kv_cache(num_layers=shape.num_layers, num_blocks=num_blocks,
                                      block_size=shape.block_size, device=device)
    else:
        built = allocate_attention_kv_cache(
            layout, num_layers=shape.num_layers, num_blocks=num_blocks, num_kv_heads=shape.num_kv_heads // tp,
            head_size=shape.head_size, block_size=shape.block_size, dtype=getattr(torch, shape.dtype), device=device,
        )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
    placement = KVCacheTensor(size=built.buffer.numel(), layers=names, layer_stride=built.layer_stride,
                              block_stride=built.block_stride)
    group = KVCacheGroupSpec(names, PageSpec(shape.block_size, built.page_bytes))
    config = KVCacheConfig(num_blocks, [placement], [group], kv_cache_layout=layout)
    kv_caches = dict(zip(names, built.views))
    return RankCache(kv_caches, config, regions_from_kv_cache_config(kv_caches, config), built.buffer)


# ---- block contents ----------------------------------------------------------------------


def chain_hash(parent: bytes, salt: bytes) -> bytes:
    """vLLM-style chained 32-byte block hash."""
    return hashlib.sha256(parent + salt).digest()


class Contents:
    """Block content as a function of a 64-bit key: a random per-rank pattern (every byte
    position of every layer differs) XOR the key in every word. A block saved under hash ``h``
    holds key ``key_of(h)`` unless the caller says otherwise; checks regenerate the bytes, so
    nothing is stored. ``replicated`` (MLA): every rank writes the same bytes."""

    def __init__(self, regions: KVRegions, rank: int, replicated: bool) -> None:
        self.regions = regions
        self.block_bytes = regions.block_bytes
        if self.block_bytes % 8:
            raise ValueError(f"block_bytes {self.block_bytes} is not a multiple of 8")
        self.salt = b"" if replicated else rank.to_bytes(4, "little")
        gen = torch.Generator().manual_seed(0x5EED + (0 if replicated else rank))
        words = torch.randint(-(1 << 62), 1 << 62, (self.block_bytes // 8,), dtype=torch.int64, generator=gen)
        self.device = regions.device
        self.pattern = words.to(self.device)
        self._scratch = torch.empty(CHUNK_BLOCKS * self.block_bytes, dtype=torch.uint8, device=self.device)

    def key_of(self, block_hash: bytes) -> int:
        digest = hashlib.blake2b(block_hash + self.salt, digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def expected(self, keys: list[int]) -> torch.Tensor:
        """The bytes of blocks with ``keys``, block-major, uint8."""
        k = torch.tensor(keys, dtype=torch.int64).to(self.device, non_blocking=True)
        return (self.pattern[None, :] ^ k[:, None]).view(torch.uint8).reshape(-1)

    def write(self, block_ids: list[int], keys: list[int], delay: Callable[[], None] | None = None) -> None:
        """The "forward": write blocks on the current stream. Ids and keys are uploaded first,
        then ``delay`` runs (a long GPU kernel), then only device work is queued: an upload from
        pageable memory would make the host wait for the delay, and nothing would be left on
        the stream for a save to wait on."""
        chunks = []
        for i in range(0, len(block_ids), CHUNK_BLOCKS):
            ids = torch.tensor(block_ids[i : i + CHUNK_BLOCKS], dtype=torch.int64).to(self.device)
            k = torch.tensor(keys[i : i + CHUNK_BLOCKS], dtype=torch.int64).to(self.device)
            chunks.append((ids, k))
        if delay is not None:
            delay()
        pages = [r.pages(self.regions.num_blocks) for r in self.regions.regions]
        offsets = self.regions.page_offsets()
        for ids, k in chunks:
            data = (self.pattern[None, :] ^ k[:, None]).view(torch.uint8)
            for page, start, region in zip(pages, offsets, self.regions.regions):
                page[ids] = data[:, start : start + region.page_bytes]

    def _holds(self, row: torch.Tensor) -> str:
        """What a block's bytes are: one key's content (which key), or none."""
        words = row.view(torch.int64) ^ self.pattern
        if bool((words == words[0]).all()):
            return f"holds key {int(words[0]):#x}"
        return "holds no key's content"

    def mismatches(self, block_ids: list[int], keys: list[int], limit: int = 5) -> list[str]:
        """Blocks whose bytes differ from their key's content (at most ``limit`` described)."""
        out: list[str] = []
        for i in range(0, len(block_ids), CHUNK_BLOCKS):
            ids, ks = block_ids[i : i + CHUNK_BLOCKS], keys[i : i + CHUNK_BLOCKS]
            got = self._scratch[: len(ids) * self.block_bytes]
            reference.gather(self.regions, ids, got)
            want = self.expected(ks)
            if torch.equal(got, want):
                continue
            rows_got, rows_want = got.view(len(ids), -1), want.view(len(ids), -1)
            for j in range(len(ids)):
                if len(out) >= limit:
                    return out
                diff = (rows_got[j] != rows_want[j]).nonzero()
                if len(diff):
                    out.append(f"block {ids[j]}: {len(diff)} bytes differ, first at byte {int(diff[0])} "
                               f"(key {ks[j]:#x}; {self._holds(rows_got[j])})")
        return out
