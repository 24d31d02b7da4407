"""Block copies between vLLM's paged KV cache and contiguous or slotted buffers.

``triton_copy`` runs on CUDA (and under Triton's interpreter in tests); ``reference`` is the
plain torch version of the same API for machines without a GPU. :func:`copier_for` picks one.
"""

from __future__ import annotations

from types import ModuleType

import torch

from pegaflow.kernels.regions import KVRegions, Region, kv_regions_from_views, region_from_view

__all__ = ["KVRegions", "Region", "copier_for", "kv_regions_from_views", "region_from_view"]


def copier_for(device: torch.device) -> ModuleType:
    """The copy module for a KV cache on ``device``: Triton on CUDA, the torch reference elsewhere."""
    if torch.device(device).type == "cuda":
        from pegaflow.kernels import triton_copy

        return triton_copy
    from pegaflow.kernels import reference

    return reference
