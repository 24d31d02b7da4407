"""How a registered KV cache is described to the copy kernels: a list of regions.

A region is a run of equally spaced pages inside one tensor's storage: block ``b``'s
bytes in that region are ``[base + b * block_stride, base + b * block_stride + page_bytes)``.
A block's content is its pages in every region, back to back (region order). This one
description covers every vLLM 0.33 layout:

* layer-first ``LBNHC`` / ``LBHNC``: one region per layer, the page holds K and V;
* block-first ``BLNHC`` / ``BLHNC``: one region whose page spans all layers;
* the older per-layer ``[2, num_blocks, ...]`` layout: a K region and a V region per layer;
* MLA ``[num_blocks, 1, block_size, 576]`` and packed ``fp8_ds_mla`` rows.

Regions hold the tensor that owns their storage, so the memory outlives every copy, and
they are checked against that storage when built: no block of a region reaches past it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Region:
    """Pages of one tensor storage: block ``b`` is ``page_bytes`` at ``offset + b * block_stride``."""

    owner: torch.Tensor = field(repr=False, compare=False)
    offset: int  # bytes from the start of the owner's storage
    block_stride: int
    page_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.owner, torch.Tensor):
            raise ValueError(f"owner must be a torch.Tensor, got {type(self.owner).__name__}")
        for name in ("offset", "block_stride", "page_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if self.page_bytes <= 0:
            raise ValueError(f"page_bytes must be > 0, got {self.page_bytes}")
        if self.block_stride < self.page_bytes:
            raise ValueError(
                f"block_stride ({self.block_stride}) must be >= page_bytes ({self.page_bytes}): "
                "pages of two blocks would overlap"
            )

    @property
    def storage_bytes(self) -> int:
        return self.owner.untyped_storage().nbytes()

    @property
    def base(self) -> int:
        """Address of block 0's page."""
        return self.owner.untyped_storage().data_ptr() + self.offset

    def max_blocks(self) -> int:
        """How many blocks fit in the owner's storage from ``offset`` on."""
        room = self.storage_bytes - self.offset - self.page_bytes
        return 0 if room < 0 else room // self.block_stride + 1

    def pages(self, num_blocks: int) -> torch.Tensor:
        """A uint8 ``[num_blocks, page_bytes]`` view of this region (no copy)."""
        raw = _storage_bytes_view(self.owner)
        return raw.as_strided((num_blocks, self.page_bytes), (self.block_stride, 1), self.offset)


@dataclass(frozen=True)
class KVRegions:
    """One rank's registered KV cache: its regions and how many blocks each holds."""

    regions: tuple[Region, ...]
    num_blocks: int

    def __post_init__(self) -> None:
        if not isinstance(self.regions, tuple) or not self.regions:
            raise ValueError("regions must be a non-empty tuple of Region")
        if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
        device = self.regions[0].owner.device
        for i, region in enumerate(self.regions):
            if not isinstance(region, Region):
                raise ValueError(f"regions[{i}] is a {type(region).__name__}, not a Region")
            if region.owner.device != device:
                raise ValueError(
                    f"regions[{i}] is on {region.owner.device}, regions[0] on {device}: "
                    "one KV cache lives on one device"
                )
            if region.max_blocks() < self.num_blocks:
                raise ValueError(
                    f"regions[{i}] holds {region.max_blocks()} blocks in its storage, "
                    f"fewer than num_blocks={self.num_blocks}"
                )
        pair = _first_overlap(self.regions, self.num_blocks)
        if pair is not None:
            raise ValueError(
                f"regions[{pair[0]}] and regions[{pair[1]}] may share bytes: a scatter would write "
                "them twice (drop aliases, as kv_regions_from_views does)"
            )

    @property
    def device(self) -> torch.device:
        return self.regions[0].owner.device

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of one block: its pages in every region, back to back."""
        return sum(r.page_bytes for r in self.regions)

    def page_offsets(self) -> list[int]:
        """Where each region's page starts inside one block's contiguous bytes."""
        offsets, total = [], 0
        for region in self.regions:
            offsets.append(total)
            total += region.page_bytes
        return offsets

    @cached_property
    def geometry(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per region: base address, block stride, page bytes, page offset inside a block.

        Computed once: the launchers need it on every copy and the storages never move.
        """
        return (
            tuple(r.base for r in self.regions),
            tuple(r.block_stride for r in self.regions),
            tuple(r.page_bytes for r in self.regions),
            tuple(self.page_offsets()),
        )

    def word_bytes(self) -> int:
        """The widest word (8, 4, 2 or 1 bytes) that divides every base, stride and page."""
        return math.gcd(8, *(g for values in self.geometry[:3] for g in values))


def _first_overlap(regions: tuple[Region, ...], num_blocks: int) -> tuple[int, int] | None:
    """Indices of two regions whose pages may share a byte, or None.

    Exact for regions whose spans are disjoint or whose strides are equal (every vLLM layout);
    two interleaved regions of different strides count as overlapping.
    """
    spans = sorted(
        (r.base, r.base + (num_blocks - 1) * r.block_stride + r.page_bytes, i) for i, r in enumerate(regions)
    )
    for a in range(len(spans)):
        start_a, end_a, i = spans[a]
        for b in range(a + 1, len(spans)):
            start_b, _, j = spans[b]
            if start_b >= end_a:
                break  # sorted by start: no later span reaches back into this one
            first, second = (regions[i], regions[j]) if start_a <= start_b else (regions[j], regions[i])
            stride = first.block_stride
            if second.block_stride != stride:
                return (min(i, j), max(i, j))
            gap = (second.base - first.base) % stride
            if gap < first.page_bytes or stride - gap < second.page_bytes:
                return (min(i, j), max(i, j))
    return None


def _storage_bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the tensor's whole storage."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(
        storage, 0, (storage.nbytes(),), (1,)
    )


def region_from_view(view: torch.Tensor) -> Region:
    """The region of a per-layer view whose first dimension is the block.

    The rest of the view (one block) must be one contiguous run of bytes, in any dim order, as
    it is for every vLLM 0.33 layout except ``LHBNC`` and ``BHLNC``.
    """
    if view.dim() < 2:
        raise ValueError(f"view must have a block dimension and a page, got shape {tuple(view.shape)}")
    # Dense in some order, not necessarily the logical one: the NHC layouts store the token
    # dim outside the head dim of a [B, H, N, C] view.
    dims = sorted((stride, size) for size, stride in zip(view.shape[1:], view.stride()[1:]) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            raise ValueError(
                f"one block of the view (shape {tuple(view.shape)}, strides {view.stride()}) "
                "is not contiguous: such a layout needs one region per contiguous run"
            )
        expected *= size
    item = view.element_size()
    return Region(
        owner=view,
        offset=view.storage_offset() * item,
        block_stride=view.stride(0) * item,
        page_bytes=expected * item,
    )


def kv_regions_from_views(views: list[torch.Tensor]) -> KVRegions:
    """Regions of per-layer block-first views ``[num_blocks, ...]``, one region per view.

    Aliases (two views over the same bytes, as vLLM's KV-sharing layers) are dropped.
    """
    if not views:
        raise ValueError("views must not be empty")
    seen: set[tuple[int, int, int]] = set()
    regions = []
    for view in views:
        region = region_from_view(view)
        key = (region.base, region.block_stride, region.page_bytes)
        if key in seen:
            continue
        seen.add(key)
        regions.append(region)
    num_blocks = min(v.shape[0] for v in views)
    return KVRegions(tuple(regions), num_blocks)
