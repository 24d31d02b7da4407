"""Triton block copies between a paged KV cache and a contiguous or slotted buffer.

One launch moves every region of a transfer. Program ``(i, r, c)`` copies chunk ``c`` of
block ``block_ids[i]``'s page in region ``r``. Everything is copied as integer words of the
widest width that every address, stride and size allows, so the copy is bit-exact for any
dtype. The buffer may be GPU memory (staging) or pinned host memory, which the kernel then
reads or writes directly over PCIe (UVA, zero-copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pegaflow.kernels.regions import KVRegions, _storage_bytes_view
from pegaflow.kernels.validate import CopyPlan, Ids, plan_copy

# Bytes one program copies; pages longer than this are split across programs. 16 KiB keeps
# enough loads in flight per program without starving small pages of parallelism
# (measured on the H200 with bench/gather_scatter.py: 8-32 KiB were within 3 %).
CHUNK_BYTES = 16 * 1024
# Bytes moved per loop step of one program (one vector of words).
STEP_BYTES = 4 * 1024
NUM_WARPS = 4

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _copy_pages_kernel(
    kv_ptr,  # word pointer: the lowest region base
    buf_ptr,  # word pointer: the buffer's start
    block_ids_ptr,  # int64 [n]
    slot_ids_ptr,  # int64 [n] (unused when not USE_SLOTS)
    region_base_ptr,  # int64 [R] words from kv_ptr
    region_stride_ptr,  # int64 [R] words between blocks
    region_page_ptr,  # int64 [R] page words
    region_offset_ptr,  # int64 [R] page start inside one block's bytes, in words
    slot_words,
    CHUNK: tl.constexpr,
    STEP: tl.constexpr,
    USE_SLOTS: tl.constexpr,
    TO_KV: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2).to(tl.int64)
    page = tl.load(region_page_ptr + r)
    chunk_start = c * CHUNK
    if chunk_start < page:
        block = tl.load(block_ids_ptr + i)
        if USE_SLOTS:
            row = tl.load(slot_ids_ptr + i)
        else:
            row = i
        kv_start = tl.load(region_base_ptr + r) + block * tl.load(region_stride_ptr + r) + chunk_start
        buf_start = row * slot_words + tl.load(region_offset_ptr + r) + chunk_start
        limit = page - chunk_start
        for k in tl.static_range(0, CHUNK, STEP):
            offs = k + tl.arange(0, STEP)
            mask = offs < limit
            if TO_KV:
                words = tl.load(buf_ptr + buf_start + offs, mask=mask)
                tl.store(kv_ptr + kv_start + offs, words, mask=mask)
            else:
                words = tl.load(kv_ptr + kv_start + offs, mask=mask)
                tl.store(buf_ptr + buf_start + offs, words, mask=mask)


def _check_devices(kv: KVRegions, buffer: torch.Tensor, name: str) -> None:
    if kv.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the KV cache is on {kv.device}: the Triton copy needs CUDA (use pegaflow.kernels.reference)")
    if buffer.device.type == "cuda":
        if buffer.device != kv.device:
            raise ValueError(f"{name} is on {buffer.device}, the KV cache on {kv.device}")
    elif not _interpreting() and not buffer.is_pinned():
        raise ValueError(f"{name} is in host memory that is not pinned: the GPU cannot reach it")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _word_view(tensor: torch.Tensor, byte_offset: int, word: int) -> torch.Tensor:
    """A word-typed 1-D tensor starting ``byte_offset`` bytes into the tensor's storage."""
    raw = _storage_bytes_view(tensor)
    usable = (raw.numel() - byte_offset) // word * word
    return raw[byte_offset : byte_offset + usable].view(_WORD_DTYPES[word])


def _launch(kv: KVRegions, plan: CopyPlan, buffer: torch.Tensor, to_kv: bool) -> None:
    if plan.count == 0:
        return
    buffer_start = buffer.storage_offset() * buffer.element_size()
    word = kv.word_bytes()
    for value in (buffer.untyped_storage().data_ptr() + buffer_start, plan.slot_bytes):
        while value % word:
            word //= 2
    anchor = min(kv.regions, key=lambda r: r.base)
    device = kv.device

    # One upload for every table of the launch: region geometry (in words) and the ids.
    geometry = [
        [(r.base - anchor.base) // word for r in kv.regions],
        [r.block_stride // word for r in kv.regions],
        [r.page_bytes // word for r in kv.regions],
        [offset // word for offset in kv.page_offsets()],
    ]
    ids = [plan.block_ids] + ([plan.slot_ids] if plan.slot_ids is not None else [])
    table = torch.cat([torch.tensor(geometry, dtype=torch.int64).flatten(), *ids]).to(device)
    num_regions, count = len(kv.regions), plan.count
    region_base, region_stride, region_page, region_offset = table[: 4 * num_regions].view(4, num_regions)
    block_ids = table[4 * num_regions : 4 * num_regions + count]
    slot_ids = table[4 * num_regions + count :] if plan.slot_ids is not None else block_ids

    # Bytes past the buffer's last row are never addressed: validation bounded the rows.
    kv_words = _word_view(anchor.owner, anchor.offset, word)
    buf_words = _word_view(buffer, buffer_start, word)
    chunk = max(1, CHUNK_BYTES // word)
    step = min(chunk, max(1, STEP_BYTES // word))
    max_page = max(r.page_bytes for r in kv.regions) // word
    grid = (plan.count, len(kv.regions), triton.cdiv(max_page, chunk))
    _copy_pages_kernel[grid](
        kv_words,
        buf_words,
        block_ids,
        slot_ids,
        region_base,
        region_stride,
        region_page,
        region_offset,
        plan.slot_bytes // word,
        CHUNK=chunk,
        STEP=step,
        USE_SLOTS=plan.slot_ids is not None,
        TO_KV=to_kv,
        num_warps=NUM_WARPS,
    )


def gather(src: KVRegions, block_ids: Ids, dst: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of ``src`` into ``dst``, block-major and contiguous."""
    plan = plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False)
    _check_devices(src, dst, "dst")
    _launch(src, plan, dst, to_kv=False)


def gather_into_slots(src: KVRegions, block_ids: Ids, dst: torch.Tensor, slot_ids: Ids, slot_bytes: int) -> None:
    """Copy block ``block_ids[i]`` of ``src`` to ``dst`` at byte ``slot_ids[i] * slot_bytes``."""
    plan = plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _check_devices(src, dst, "dst")
    _launch(src, plan, dst, to_kv=False)


def scatter(dst: KVRegions, block_ids: Ids, src: torch.Tensor) -> None:
    """Copy the contiguous block-major ``src`` into blocks ``block_ids`` of ``dst``."""
    plan = plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True)
    _check_devices(dst, src, "src")
    _launch(dst, plan, src, to_kv=True)


def scatter_from_slots(dst: KVRegions, block_ids: Ids, src: torch.Tensor, slot_ids: Ids, slot_bytes: int) -> None:
    """Copy ``src`` at byte ``slot_ids[i] * slot_bytes`` into block ``block_ids[i]`` of ``dst``."""
    plan = plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _check_devices(dst, src, "src")
    _launch(dst, plan, src, to_kv=True)
