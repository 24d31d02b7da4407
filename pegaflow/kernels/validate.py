"""Checks every copy's arguments before anything is launched.

Both copy implementations (Triton and the torch reference) call :func:`plan_copy`, so a bad
id, size or device is a ``ValueError`` naming the argument, whichever runs, and no id can
make a copy touch memory outside the registered regions and the given buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pegaflow.kernels.regions import KVRegions

Ids = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class CopyPlan:
    """Validated arguments of one copy, ids as int64 CPU tensors."""

    block_ids: torch.Tensor
    slot_ids: torch.Tensor | None  # None: contiguous, block i at i * slot_bytes
    slot_bytes: int
    buffer_bytes: int

    @property
    def count(self) -> int:
        return int(self.block_ids.numel())


def as_id_tensor(ids: Ids, name: str) -> torch.Tensor:
    """``ids`` as a 1-D int64 CPU tensor; rejects floats, bools and other shapes."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        return ids.detach().to(device="cpu", dtype=torch.int64)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a sequence of ints or an integer tensor, got {type(ids).__name__}")
    for value in ids:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must hold ints, found {value!r}")
    try:
        return torch.tensor(list(ids), dtype=torch.int64)
    except RuntimeError as exc:  # an int beyond int64
        raise ValueError(f"{name} holds an id that does not fit in int64") from exc


def _check_range(ids: torch.Tensor, limit: int, name: str) -> None:
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ValueError(f"{name} holds a negative id ({low})")
    if high >= limit:
        raise ValueError(f"{name} holds id {high}, out of range [0, {limit})")


def _check_unique(ids: torch.Tensor, name: str) -> None:
    if ids.numel() > 1 and torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name} holds duplicate ids: two copies would write the same place")


def _check_buffer(buffer: torch.Tensor, name: str) -> int:
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(buffer).__name__}")
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return buffer.numel() * buffer.element_size()


def plan_copy(
    kv: KVRegions,
    block_ids: Ids,
    buffer: torch.Tensor,
    *,
    buffer_name: str,
    to_kv: bool,
    slot_ids: Ids | None = None,
    slot_bytes: int | None = None,
) -> CopyPlan:
    """Validate one gather (``to_kv=False``) or scatter (``to_kv=True``).

    Without ``slot_ids`` the buffer is block-major and contiguous: block ``i`` of the
    transfer occupies ``[i * block_bytes, (i + 1) * block_bytes)``. With them, block ``i``
    goes to (or comes from) ``slot_ids[i] * slot_bytes``.
    """
    if not isinstance(kv, KVRegions):
        raise ValueError(f"kv must be KVRegions, got {type(kv).__name__}")
    blocks = as_id_tensor(block_ids, "block_ids")
    _check_range(blocks, kv.num_blocks, "block_ids")
    if to_kv:
        _check_unique(blocks, "block_ids")
    buffer_bytes = _check_buffer(buffer, buffer_name)
    block_bytes = kv.block_bytes

    if slot_ids is None:
        if slot_bytes is not None:
            raise ValueError("slot_bytes is given without slot_ids")
        needed = blocks.numel() * block_bytes
        if buffer_bytes < needed:
            raise ValueError(
                f"{buffer_name} holds {buffer_bytes} bytes, {blocks.numel()} blocks need {needed}"
            )
        return CopyPlan(blocks, None, block_bytes, buffer_bytes)

    if not isinstance(slot_bytes, int) or isinstance(slot_bytes, bool) or slot_bytes <= 0:
        raise ValueError(f"slot_bytes must be a positive int, got {slot_bytes!r}")
    if slot_bytes < block_bytes:
        raise ValueError(f"slot_bytes ({slot_bytes}) is smaller than one block ({block_bytes} bytes)")
    slots = as_id_tensor(slot_ids, "slot_ids")
    if slots.numel() != blocks.numel():
        raise ValueError(f"slot_ids has {slots.numel()} ids, block_ids {blocks.numel()}")
    _check_range(slots, buffer_bytes // slot_bytes, "slot_ids")
    if not to_kv:
        _check_unique(slots, "slot_ids")
    return CopyPlan(blocks, slots, slot_bytes, buffer_bytes)
