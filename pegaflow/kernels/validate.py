"""Checks every copy's arguments before anything is launched.

Both copy implementations (Triton and the torch reference) call :func:`plan_copy`, so a bad
id, size or device is a ``ValueError`` naming the argument, whichever runs, and no id can
make a copy touch memory outside the registered regions and the given buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pegaflow.kernels.regions import KVRegions

Ids = Sequence[int] | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class CopyPlan:
    """Validated arguments of one copy, ids as 1-D int64 numpy arrays."""

    block_ids: np.ndarray
    slot_ids: np.ndarray | None  # None: contiguous, block i at i * slot_bytes
    slot_bytes: int
    buffer_bytes: int

    @property
    def count(self) -> int:
        return int(self.block_ids.size)


# numpy rather than torch: a launch validates its ids on every call, and numpy's per-call
# cost on a few hundred ids is a few microseconds where torch's is tens.
def as_id_array(ids: Ids, name: str) -> np.ndarray:
    """``ids`` as a 1-D int64 numpy array; rejects floats, bools, other shapes, ints beyond int64."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        return ids.detach().to(device="cpu", dtype=torch.int64).numpy()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence of ints or an integer tensor, got {type(ids).__name__}")
    if len(ids) == 0:
        return np.empty(0, dtype=np.int64)
    try:
        array = np.asarray(ids)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{name} must be a flat sequence of ints") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        bad = [v for v in ids if not isinstance(v, (int, np.integer)) or isinstance(v, bool)]
        if not bad:  # Python ints beyond 64 bits make an object array
            raise ValueError(f"{name} holds an id that does not fit in int64")
        raise ValueError(f"{name} must hold ints, found {bad[0]!r}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds an id that does not fit in int64")
    return array.astype(np.int64, copy=False)


def _check_range(ids: np.ndarray, limit: int, name: str) -> None:
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ValueError(f"{name} holds a negative id ({low})")
    if high >= limit:
        raise ValueError(f"{name} holds id {high}, out of range [0, {limit})")


def _check_unique(ids: np.ndarray, name: str) -> None:
    if ids.size > 1 and np.unique(ids).size != ids.size:
        raise ValueError(f"{name} holds duplicate ids: two copies would write the same place")


def _block_ids(kv: KVRegions, block_ids: Ids, to_kv: bool) -> np.ndarray:
    """The ids as an int64 array, each a block of ``kv``; unique when the copy writes the KV cache."""
    if not isinstance(kv, KVRegions):
        raise ValueError(f"kv must be KVRegions, got {type(kv).__name__}")
    blocks = as_id_array(block_ids, "block_ids")
    _check_range(blocks, kv.num_blocks, "block_ids")
    if to_kv:
        _check_unique(blocks, "block_ids")
    return blocks


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
    blocks = _block_ids(kv, block_ids, to_kv)
    buffer_bytes = _check_buffer(buffer, buffer_name)
    block_bytes = kv.block_bytes

    if slot_ids is None:
        if slot_bytes is not None:
            raise ValueError("slot_bytes is given without slot_ids")
        needed = blocks.size * block_bytes
        if buffer_bytes < needed:
            raise ValueError(
                f"{buffer_name} holds {buffer_bytes} bytes, {blocks.size} blocks need {needed}"
            )
        return CopyPlan(blocks, None, block_bytes, buffer_bytes)

    if not isinstance(slot_bytes, int) or isinstance(slot_bytes, bool) or slot_bytes <= 0:
        raise ValueError(f"slot_bytes must be a positive int, got {slot_bytes!r}")
    if slot_bytes < block_bytes:
        raise ValueError(f"slot_bytes ({slot_bytes}) is smaller than one block ({block_bytes} bytes)")
    slots = as_id_array(slot_ids, "slot_ids")
    if slots.size != blocks.size:
        raise ValueError(f"slot_ids has {slots.size} ids, block_ids {blocks.size}")
    _check_range(slots, buffer_bytes // slot_bytes, "slot_ids")
    if not to_kv:
        _check_unique(slots, "slot_ids")
    return CopyPlan(blocks, slots, slot_bytes, buffer_bytes)


def plan_table(kv: KVRegions, block_ids: Ids, pitch: int, *, to_kv: bool) -> np.ndarray:
    """Validate a block table's ids (in range; unique when writing the KV cache) and row pitch."""
    if not isinstance(kv, KVRegions):
        raise ValueError(f"kv must be KVRegions, got {type(kv).__name__}")
    if not isinstance(pitch, int) or isinstance(pitch, bool) or pitch < kv.block_bytes or pitch % 16:
        raise ValueError(f"pitch must be a multiple of 16 of at least one block ({kv.block_bytes} bytes), "
                         f"got {pitch!r}")
    return _block_ids(kv, block_ids, to_kv)


def check_rows(table_count: int, pitch: int, first: int, count: int, buffer: torch.Tensor, align: int) -> None:
    """Blocks ``[first, first + count)`` of a table of ``table_count`` fit the buffer's rows."""
    if not (isinstance(first, int) and isinstance(count, int) and 0 <= first and 0 <= count
            and first + count <= table_count):
        raise ValueError(f"rows [{first!r}, +{count!r}) are not within the table's {table_count} blocks")
    nbytes = _check_buffer(buffer, "buffer")
    if buffer.data_ptr() % align:
        raise ValueError(f"buffer must start at a multiple of {align} bytes")
    if nbytes < count * pitch:
        raise ValueError(f"buffer holds {nbytes} bytes, {count} rows of {pitch} need {count * pitch}")
