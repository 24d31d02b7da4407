"""vLLM 0.33 KV cache layouts as regions, and builders that allocate them as vLLM does.

:func:`regions_from_kv_cache_tensor` turns one ``KVCacheTensor`` placement (vLLM's
``kv_cache_config.kv_cache_tensors``) into :class:`KVRegions`; the connector uses it without
importing vLLM here. The builders allocate a KV cache exactly as vLLM 0.33's
``allocate_kv_cache`` does: ONE int8 backing buffer, a 5-D ``torch.as_strided`` view in logical
``[L, B, H, N, C]`` order with the layout's stride permutation, one ``[B, H, N, C]`` view per
layer, then ``.view(dtype)``. They serve the tests and the benchmarks, on CPU or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pegaflow.kernels.regions import KVRegions, Region, region_from_view

# Stride permutations of vLLM 0.33's ``KVCacheLayout`` over logical ``[L, B, H, N, C]``: entry
# ``i`` is the logical axis stored ``i``-th outermost. ``LHBNC`` and ``BHLNC`` are left out: a
# block of one layer is not one contiguous run there.
LAYOUT_ORDERS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
}

# Per-token content of MLA caches: ``kv_lora_rank + qk_rope_head_dim`` bf16 elements, or the
# packed ``fp8_ds_mla`` row (fp8 latent, scales and a bf16 rope part) in uint8.
MLA_CONTENT = 576
FP8_DS_MLA_ROW_BYTES = 656


def regions_from_kv_cache_tensor(
    buffer: torch.Tensor,
    *,
    offset: int,
    layer_stride: int,
    block_stride: int,
    page_bytes: int,
    num_layers: int,
    num_blocks: int,
) -> KVRegions:
    """Regions of one vLLM ``KVCacheTensor``: layer ``l``, block ``b`` at
    ``offset + l * layer_stride + b * block_stride`` bytes, ``page_bytes`` long.

    ``buffer`` is any tensor over the backing storage (the int8 buffer or a layer's view);
    byte offsets count from the start of that storage. When the layers of a block lie back to
    back (``layer_stride == page_bytes``: the block-first layouts) they form one region whose
    page spans all layers: the same bytes in the same order, fewer and longer copies.
    """
    for name, value in (("offset", offset), ("layer_stride", layer_stride), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if num_layers == 0:
        raise ValueError("num_layers must be > 0")
    if num_layers > 1 and layer_stride < page_bytes:
        raise ValueError(f"layer_stride ({layer_stride}) is smaller than page_bytes ({page_bytes}): layers overlap")
    if num_layers == 1 or (layer_stride == page_bytes and block_stride >= num_layers * page_bytes):
        regions = (Region(buffer, offset, block_stride, num_layers * page_bytes),)
    else:
        regions = tuple(Region(buffer, offset + l * layer_stride, block_stride, page_bytes) for l in range(num_layers))
    return KVRegions(regions, num_blocks)


@dataclass(frozen=True)
class BuiltKVCache:
    """A KV cache allocated as vLLM allocates it: the backing buffer, the per-layer views
    vLLM hands to ``register_kv_caches``, and the regions that describe it."""

    buffer: torch.Tensor = field(repr=False)
    views: list[torch.Tensor] = field(repr=False)
    regions: KVRegions = field(repr=False)
    layer_stride: int
    block_stride: int
    page_bytes: int


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _layout_strides(shape: tuple[int, ...], order: tuple[int, ...]) -> tuple[int, ...]:
    """Dense strides of ``shape`` (logical order) stored in ``order`` (outermost first), as
    vLLM's ``compute_layout_strides`` computes them for unpadded pages."""
    strides = [0] * len(shape)
    current = 1
    for dim in reversed(order):
        strides[dim] = current
        current *= shape[dim]
    return tuple(strides)


def allocate_kv_cache(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    num_heads: int,
    block_size: int,
    content: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> BuiltKVCache:
    """One KV cache group as vLLM 0.33 allocates it: per-layer views ``[B, H, N, C]``.

    ``content`` is ``C``, the elements of one (head, token) cell: ``2 * head_size`` for
    attention (K and V concatenated), 576 for MLA, 656 uint8 for ``fp8_ds_mla``. The buffer is
    filled with random bytes (vLLM zeroes it; tests need data that can be told apart).
    """
    if layout not in LAYOUT_ORDERS:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_ORDERS)}, got {layout!r}")
    _check_positive(num_layers=num_layers, num_blocks=num_blocks, num_heads=num_heads, block_size=block_size, content=content)
    order = LAYOUT_ORDERS[layout]
    item = torch.empty((), dtype=dtype).element_size()
    shape = (num_layers, num_blocks, num_heads, block_size, content * item)  # C in bytes
    strides = _layout_strides(shape, order)
    layer_stride, block_stride = strides[0], strides[1]
    page_bytes = num_heads * block_size * content * item
    size = num_layers * num_blocks * page_bytes
    buffer = _random_int8(size, device)
    view_5d = torch.as_strided(buffer, size=shape, stride=strides, storage_offset=buffer.storage_offset())
    views = [view_5d[l].view(dtype) for l in range(num_layers)]
    regions = regions_from_kv_cache_tensor(
        buffer,
        offset=0,
        layer_stride=layer_stride,
        block_stride=block_stride,
        page_bytes=page_bytes,
        num_layers=num_layers,
        num_blocks=num_blocks,
    )
    return BuiltKVCache(buffer, views, regions, layer_stride, block_stride, page_bytes)


def allocate_attention_kv_cache(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> BuiltKVCache:
    """Full attention: each (head, token) cell holds K then V, ``2 * head_size`` elements."""
    _check_positive(head_size=head_size)
    return allocate_kv_cache(
        layout,
        num_layers=num_layers,
        num_blocks=num_blocks,
        num_heads=num_kv_heads,
        block_size=block_size,
        content=2 * head_size,
        dtype=dtype,
        device=device,
    )


def allocate_mla_kv_cache(
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int = 64,
    fp8_ds_mla: bool = False,
    layout: str = "LBNHC",
    device: torch.device | str = "cpu",
) -> BuiltKVCache:
    """MLA: views ``[B, 1, N, 576]`` bf16, or ``[B, 1, N, 656]`` uint8 for ``fp8_ds_mla``."""
    content, dtype = (FP8_DS_MLA_ROW_BYTES, torch.uint8) if fp8_ds_mla else (MLA_CONTENT, torch.bfloat16)
    return allocate_kv_cache(
        layout,
        num_layers=num_layers,
        num_blocks=num_blocks,
        num_heads=1,
        block_size=block_size,
        content=content,
        dtype=dtype,
        device=device,
    )


def allocate_kv_first_cache(
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> BuiltKVCache:
    """The older per-layer ``[2, num_blocks, block_size, heads, head]`` layout (K at index 0,
    V at 1), layer after layer in one int8 buffer: a K region and a V region per layer."""
    _check_positive(
        num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size
    )
    item = torch.empty((), dtype=dtype).element_size()
    page_bytes = block_size * num_kv_heads * head_size * item
    layer_bytes = 2 * num_blocks * page_bytes
    buffer = _random_int8(num_layers * layer_bytes, device)
    shape = (2, num_blocks, block_size, num_kv_heads, head_size * item)
    strides = (num_blocks * page_bytes, page_bytes, num_kv_heads * head_size * item, head_size * item, 1)
    views = [
        torch.as_strided(buffer, size=shape, stride=strides, storage_offset=buffer.storage_offset() + l * layer_bytes).view(dtype)
        for l in range(num_layers)
    ]
    regions = KVRegions(tuple(r for view in views for r in regions_from_kv_first_view(view)), num_blocks)
    return BuiltKVCache(buffer, views, regions, layer_bytes, page_bytes, page_bytes)


def regions_from_kv_first_view(view: torch.Tensor) -> tuple[Region, Region]:
    """The K and V regions of one ``[2, num_blocks, ...]`` layer view."""
    if view.dim() < 3 or view.shape[0] != 2:
        raise ValueError(f"view must be [2, num_blocks, ...], got shape {tuple(view.shape)}")
    return region_from_view(view[0]), region_from_view(view[1])


def _random_int8(size: int, device: torch.device | str) -> torch.Tensor:
    """An int8 buffer of random bytes (one allocation, as vLLM's ``torch.zeros``)."""
    buffer = torch.empty(size, dtype=torch.int8, device=device)
    buffer.random_(-128, 128)
    return buffer
