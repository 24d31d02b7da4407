"""Plain torch block copies: the reference the kernels are tested against, and the copy path
of machines without a GPU (CPU mode of the engine and server).

Same API and same validation as :mod:`pegaflow.kernels.triton_copy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pegaflow.kernels.regions import KVRegions, _storage_bytes_view
from pegaflow.kernels.validate import CopyPlan, Ids, check_rows, plan_copy, plan_table


def _buffer_rows(buffer: torch.Tensor, plan: CopyPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffer as uint8 rows of ``slot_bytes`` and the row of each block of the transfer."""
    raw = _storage_bytes_view(buffer)
    start = buffer.storage_offset() * buffer.element_size()
    rows = raw.as_strided((plan.buffer_bytes // plan.slot_bytes, plan.slot_bytes), (plan.slot_bytes, 1), start)
    index = torch.from_numpy(plan.slot_ids) if plan.slot_ids is not None else torch.arange(plan.count, dtype=torch.int64)
    return rows, index.to(buffer.device)


def _copy(kv: KVRegions, plan: CopyPlan, buffer: torch.Tensor, to_kv: bool) -> None:
    if plan.count == 0:
        return
    rows, row_index = _buffer_rows(buffer, plan)
    block_index = torch.from_numpy(plan.block_ids).to(kv.device)
    for region, start in zip(kv.regions, kv.page_offsets()):
        pages = region.pages(kv.num_blocks)
        end = start + region.page_bytes
        if to_kv:
            pages[block_index] = rows[row_index, start:end].to(kv.device)
        else:
            rows[row_index, start:end] = pages[block_index].to(buffer.device)


def gather(src: KVRegions, block_ids: Ids, dst: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of ``src`` into ``dst``, block-major and contiguous."""
    _copy(src, plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False), dst, to_kv=False)


def gather_into_slots(src: KVRegions, block_ids: Ids, dst: torch.Tensor, slot_ids: Ids, slot_bytes: int) -> None:
    """Copy block ``block_ids[i]`` of ``src`` to ``dst`` at byte ``slot_ids[i] * slot_bytes``."""
    plan = plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _copy(src, plan, dst, to_kv=False)


def scatter(dst: KVRegions, block_ids: Ids, src: torch.Tensor) -> None:
    """Copy the contiguous block-major ``src`` into blocks ``block_ids`` of ``dst``."""
    _copy(dst, plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True), src, to_kv=True)


def scatter_from_slots(dst: KVRegions, block_ids: Ids, src: torch.Tensor, slot_ids: Ids, slot_bytes: int) -> None:
    """Copy ``src`` at byte ``slot_ids[i] * slot_bytes`` into block ``block_ids[i]`` of ``dst``."""
    plan = plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _copy(dst, plan, src, to_kv=True)


@dataclass(frozen=True, eq=False)
class BlockTable:
    """One transfer's checked block ids, copied in ranges of rows (see triton_copy.BlockTable)."""

    kv: KVRegions
    count: int
    pitch: int
    to_kv: bool
    ids: np.ndarray


def block_table(kv: KVRegions, block_ids: Ids, pitch: int, *, to_kv: bool, upload: object = None) -> BlockTable:
    """Check ``block_ids`` (in range; unique when writing the KV cache) and the row pitch.
    The ids stay on the host (``upload``, the Triton copy's device upload, is not used)."""
    ids = plan_table(kv, block_ids, pitch, to_kv=to_kv)
    return BlockTable(kv, int(ids.size), pitch, to_kv, ids)


def launch_rows(table: BlockTable, first: int, count: int, buffer: torch.Tensor) -> None:
    """Blocks ``[first, first + count)`` of ``table`` <-> rows ``0 .. count - 1`` of ``buffer``."""
    check_rows(table.count, table.pitch, first, count, buffer, 1)
    ids, rows = table.ids[first : first + count], list(range(count))
    if table.to_kv:
        scatter_from_slots(table.kv, ids, buffer, rows, table.pitch)
    else:
        gather_into_slots(table.kv, ids, buffer, rows, table.pitch)
