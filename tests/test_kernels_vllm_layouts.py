"""Our layout builders against vLLM 0.33's own ``allocate_kv_cache`` (CPU; skipped without vLLM).

Importing vLLM takes ~20 s, so this lives apart from tests/test_kernels.py.
"""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.config import CacheConfig  # noqa: E402
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MLAAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache as vllm_allocate_kv_cache  # noqa: E402

from pegaflow.kernels import kv_regions_from_views, reference  # noqa: E402
from pegaflow.kernels.layouts import (  # noqa: E402
    allocate_attention_kv_cache,
    allocate_mla_kv_cache,
    regions_from_kv_cache_tensor,
)

NUM_LAYERS, NUM_BLOCKS = 3, 10


def _vllm_cache(spec, layout: str) -> tuple[dict[str, torch.Tensor], object]:
    """vLLM's own planning and allocation of one group of NUM_LAYERS layers on the CPU."""
    cache_config = CacheConfig(block_size=spec.block_size)
    cache_config.kv_cache_layout = layout
    # The planner reads only these fields of the VllmConfig.
    vllm_config = types.SimpleNamespace(
        cache_config=cache_config, attention_config=types.SimpleNamespace(hisparse_config=None)
    )
    names = [f"layer.{i}" for i in range(NUM_LAYERS)]
    config = get_kv_cache_config_from_groups(
        vllm_config, [KVCacheGroupSpec(names, spec)], NUM_BLOCKS * NUM_LAYERS * spec.page_size_bytes
    )
    assert config.num_blocks == NUM_BLOCKS
    caches = vllm_allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout[layout])
    return caches, config


def _check_same_views(ours, theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert a.storage_offset() == b.storage_offset()
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()


CASES = [
    ("LBNHC", "attention"),
    ("LBHNC", "attention"),
    ("BLNHC", "attention"),
    ("BLHNC", "attention"),
    ("LBNHC", "mla"),
    ("BLNHC", "mla"),
    ("LBNHC", "fp8_ds_mla"),
]


@pytest.mark.parametrize(("layout", "kind"), CASES)
def test_builder_matches_vllm_allocate_kv_cache(layout: str, kind: str) -> None:
    if kind == "attention":
        spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
        ours = allocate_attention_kv_cache(
            layout, num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, num_kv_heads=2, head_size=64, block_size=16,
            dtype=torch.bfloat16,
        )
    else:
        fp8 = kind == "fp8_ds_mla"
        spec = MLAAttentionSpec(
            block_size=8,
            num_kv_heads=1,
            max_tp_shards=1,
            head_size=576,
            dtype=torch.uint8 if fp8 else torch.bfloat16,
            cache_dtype_str="fp8_ds_mla" if fp8 else "auto",
            state_content_bytes=656 if fp8 else None,
        )
        ours = allocate_mla_kv_cache(
            num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, block_size=8, fp8_ds_mla=fp8, layout=layout
        )
    caches, config = _vllm_cache(spec, layout)
    theirs = list(caches.values())
    _check_same_views(ours.views, theirs)
    assert ours.page_bytes == spec.page_size_bytes

    # The connector's path: regions from the KVCacheTensor placement, on vLLM's own buffer.
    (placement,) = config.kv_cache_tensors
    assert (placement.layer_stride, placement.block_stride) == (ours.layer_stride, ours.block_stride)
    regions = regions_from_kv_cache_tensor(
        theirs[0],
        offset=placement.offset,
        layer_stride=placement.layer_stride,
        block_stride=placement.block_stride,
        page_bytes=spec.page_size_bytes,
        num_layers=len(placement.layers),
        num_blocks=config.num_blocks,
    )
    assert [(r.offset, r.block_stride, r.page_bytes) for r in regions.regions] == [
        (r.offset, r.block_stride, r.page_bytes) for r in ours.regions.regions
    ]

    # Same block bytes as regions taken from vLLM's per-layer views, on random content.
    raw = theirs[0].untyped_storage()
    torch.empty(0, dtype=torch.uint8).set_(raw, 0, (raw.nbytes(),), (1,)).random_(0, 256)
    by_views = kv_regions_from_views(theirs)
    ids = [7, 0, 3]
    a = torch.empty(len(ids) * regions.block_bytes, dtype=torch.uint8)
    b = torch.empty(len(ids) * by_views.block_bytes, dtype=torch.uint8)
    reference.gather(regions, ids, a)
    reference.gather(by_views, ids, b)
    assert torch.equal(a, b)
    # And block 7 of layer 1 holds what the view says, in physical (memory) order.
    physical = [d - 1 for d in KVCacheLayout[layout].layer_view_order if d != 0]
    page = theirs[1][7].permute(physical).contiguous().view(torch.uint8).flatten()
    start = regions.block_bytes // NUM_LAYERS
    assert torch.equal(a[start : start + page.numel()], page)
