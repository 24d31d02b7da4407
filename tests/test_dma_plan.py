"""The copy-engine save plan (``dma.strided_plan``): for every vLLM layout, the 2D copies it
describes, replayed on the CPU, produce exactly the reference gather's bytes."""

from __future__ import annotations

import pytest
import torch

from pegaflow.engine import dma
from pegaflow.kernels import reference
from pegaflow.kernels.layouts import (
    LAYOUT_ORDERS,
    allocate_attention_kv_cache,
    allocate_kv_first_cache,
    allocate_mla_kv_cache,
)
from pegaflow.kernels.regions import KVRegions, Region

NUM_BLOCKS = 12


def caches():
    for layout in sorted(LAYOUT_ORDERS):
        yield layout, allocate_attention_kv_cache(layout, num_layers=3, num_blocks=NUM_BLOCKS, num_kv_heads=2,
                                                  head_size=8, block_size=4, dtype=torch.bfloat16)
    yield "mla", allocate_mla_kv_cache(num_layers=3, num_blocks=NUM_BLOCKS, block_size=4)
    yield "kv_first", allocate_kv_first_cache(num_layers=3, num_blocks=NUM_BLOCKS, block_size=4, num_kv_heads=2,
                                              head_size=8, dtype=torch.bfloat16)


def replay(plan, kv: KVRegions, buffer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """What the 2D copies of ``plan`` write into consecutive slots, done with CPU slicing."""
    raw = buffer.view(torch.uint8)
    base = raw.data_ptr()
    stride = kv.regions[0].block_stride
    slot = kv.block_bytes
    out = torch.full((len(block_ids) * slot,), 0xA5, dtype=torch.uint8)
    for j, b in enumerate(block_ids):
        for rows in plan:
            for i in range(rows.height):
                src = rows.src - base + b * stride + i * rows.src_pitch
                dst = j * slot + rows.dst + i * rows.dst_pitch
                out[dst : dst + rows.width] = raw[src : src + rows.width]
    return out


@pytest.mark.parametrize("name,cache", list(caches()), ids=lambda v: v if isinstance(v, str) else "")
def test_plan_replays_to_the_reference_gather(name, cache):
    kv = cache.regions
    plan = dma.strided_plan(kv.geometry)
    assert plan is not None, f"{name}: every vLLM layout should line up as strided rows"
    assert len(plan) == 1  # [2, blocks, ...] per layer, layer after layer, is evenly spaced too
    ids = torch.randperm(NUM_BLOCKS)[:7].tolist()
    expected = torch.empty(len(ids) * kv.block_bytes, dtype=torch.uint8)
    reference.gather(kv, ids, expected)
    assert torch.equal(replay(plan, kv, cache.buffer, ids), expected)


def test_block_first_layouts_are_one_contiguous_run_per_block():
    cache = allocate_attention_kv_cache("BLNHC", num_layers=3, num_blocks=NUM_BLOCKS, num_kv_heads=2, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)
    (rows,) = dma.strided_plan(cache.regions.geometry)
    assert rows.contiguous and rows.run_bytes == cache.regions.block_bytes


def _regions(offsets: list[int], page: int, stride: int, pages: list[int] | None = None) -> KVRegions:
    owner = torch.randint(-128, 127, (max(offsets) + stride * 4 + page * 4,), dtype=torch.int8)
    pages = pages or [page] * len(offsets)
    return KVRegions(tuple(Region(owner, o, stride, p) for o, p in zip(offsets, pages)), 4)


def test_k_and_v_apart_are_two_row_sets():
    # K pages of 3 layers 4096 apart, V pages 4096 apart but 1000 after their K
    kv = _regions([0, 1000, 4096, 5096, 8192, 9192], page=64, stride=64)
    plan = dma.strided_plan(kv.geometry)
    assert plan is not None and [(r.dst, r.dst_pitch, r.src_pitch, r.height) for r in plan] == [
        (0, 128, 4096, 3), (64, 128, 4096, 3)]
    ids = [2, 0, 3]
    expected = torch.empty(len(ids) * kv.block_bytes, dtype=torch.uint8)
    reference.gather(kv, ids, expected)
    assert torch.equal(replay(plan, kv, kv.regions[0].owner, ids), expected)


def test_irregular_spacing_has_no_plan():
    kv = _regions([0, 1000, 3000], page=64, stride=64)
    assert dma.strided_plan(kv.geometry) is None


def test_unequal_pages_have_no_plan():
    kv = _regions([0, 1000, 2000], page=64, stride=128, pages=[64, 64, 32])
    assert dma.strided_plan(kv.geometry) is None


def test_rows_further_apart_than_the_max_pitch_have_no_plan():
    bases = (0, dma.MAX_PITCH + 1, 2 * (dma.MAX_PITCH + 1))
    geometry = (bases, (64,) * 3, (64,) * 3, (0, 64, 128))
    assert dma.strided_plan(geometry) is None
    assert dma.strided_plan(((0, 4096, 8192), (64,) * 3, (64,) * 3, (0, 64, 128))) is not None


def test_one_region_is_one_row():
    (rows,) = dma.strided_plan(((4096,), (256,), (64,), (0,)))
    assert (rows.src, rows.width, rows.height, rows.dst) == (4096, 64, 1, 0)
