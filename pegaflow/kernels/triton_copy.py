"""Triton block copies between a paged KV cache and a contiguous or slotted buffer.

One launch moves every region of a transfer. Program ``(c, r, i)`` copies chunk ``c`` of
block ``block_ids[i]``'s page in region ``r``. Everything is copied as integer words of the
widest width that every address, stride and size allows, so the copy is bit-exact for any
dtype. The buffer may be GPU memory (staging) or pinned host memory, which the kernel then
reads or writes directly over PCIe (UVA, zero-copy).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

try:  # the launch hooks a direct launch passes on as JITFunction.run would
    from triton import knobs as _knobs
except ImportError:  # Triton before 3.4 (its launcher took other arguments): no direct launches
    _knobs = None

from pegaflow.kernels.regions import KVRegions, _storage_bytes_view
from pegaflow.kernels.validate import CopyPlan, Ids, check_rows, plan_copy, plan_table

# The releases whose JITFunction.run launches as _launch_variant does (read in their source);
# another release launches through JITFunction.run until someone has checked it.
_DIRECT_LAUNCH_TRITON = ("3.4", "3.5", "3.6", "3.7", "3.8")


def direct_launch_supported(version: str) -> bool:
    """Whether Triton ``version`` (e.g. ``3.6.0``, ``3.8.0+git1234``) may take direct launches."""
    return ".".join(version.split(".")[:2]) in _DIRECT_LAUNCH_TRITON


if not direct_launch_supported(triton.__version__):
    _knobs = None


@dataclass(frozen=True)
class Tuning:
    """Launch shape: bytes per program, bytes per load/store step, warps per program."""

    chunk_bytes: int
    step_bytes: int
    num_warps: int
    streaming: bool = False  # cache hints: loads evict first, stores stream (data used once)

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "step_bytes", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value!r}")
        if self.step_bytes < 8:
            raise ValueError(f"step_bytes must be >= 8 (one widest word), got {self.step_bytes}")
        if self.step_bytes > self.chunk_bytes:
            raise ValueError(f"step_bytes ({self.step_bytes}) exceeds chunk_bytes ({self.chunk_bytes})")
        if self.num_warps > 32:
            raise ValueError(f"num_warps must be <= 32, got {self.num_warps}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"streaming must be a bool, got {self.streaming!r}")

    @classmethod
    def parse(cls, text: str) -> Tuning:
        """``"CHUNK:STEP:WARPS"`` in bytes, e.g. ``"16384:16384:4"``; a trailing ``:s`` adds
        streaming cache hints."""
        parts = text.split(":")
        streaming = len(parts) == 4 and parts[3] == "s"
        try:
            if len(parts) - streaming != 3:
                raise ValueError(text)
            chunk, step, warps = (int(part) for part in parts[:3])
        except ValueError as exc:
            raise ValueError(f"tuning must be CHUNK:STEP:WARPS[:s], got {text!r}") from exc
        return cls(chunk, step, warps, streaming)

    def __str__(self) -> str:
        return f"{self.chunk_bytes}:{self.step_bytes}:{self.num_warps}" + (":s" if self.streaming else "")


# Bytes one program copies (pages longer than this are split across programs), bytes each
# load/store step moves (a step's loads are all in flight before its stores), and warps per
# program. Chosen on an NVIDIA H200, bench/gather_scatter.py over 7 configs: 16384:4096:4 had
# the best geometric mean of five shapes in session 1 (gather/d2d 0.934); in session 2 (two
# runs, 2026-11-27) 8 warps beat it in every config by ~1 % (geometric mean 0.949 vs 0.934,
# 70B-TP8's 8 KiB pages 0.906-0.909 vs 0.897-0.904); streaming cache hints did not help.
DEFAULT_TUNING = Tuning(chunk_bytes=16 * 1024, step_bytes=4 * 1024, num_warps=8)
# Pages whose power-of-two alignment is at least this are cut into chunks that divide them
# evenly, so no program needs a mask; smaller even chunks would mean many tiny programs, so
# such pages (fp8_ds_mla's 656-byte rows) take masked chunks of the tuned size instead.
# Chosen by reasoning, not measured: the masked path is vectorised too (alignment hints).
MIN_EVEN_CHUNK_BYTES = 2 * 1024
# Widest access Triton emits per thread: alignment hints beyond this buy nothing.
VECTOR_BYTES = 16
# CUDA limits grid dims 1 and 2 to 65535 programs: more blocks take more launches.
MAX_GRID_YZ = 65535

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


# Launch indices are not specialised on: each distinct value class (1, multiples of 16) would
# compile another variant while a staged transfer walks its chunks.
@triton.jit(do_not_specialize=["count", "first", "row_shift"])
def _copy_pages_kernel(
    kv_ptr,  # word pointer: the lowest region base
    buf_ptr,  # word pointer: the buffer's start
    table_ptr,  # int64: region bases, strides, pages, offsets ([R] each, words), block ids, slot ids
    num_regions,
    count,
    first,  # index of this launch's first block in the id lists
    row_shift,  # without slots, block i of the lists is row i - row_shift of the buffer
    slot_words,
    CHUNK: tl.constexpr,  # words per program
    STEP: tl.constexpr,  # words per load/store step
    ALIGN: tl.constexpr,  # every start (and, masked, every page) is a multiple of ALIGN words
    EVEN: tl.constexpr,  # every page is a multiple of CHUNK: no mask
    USE_SLOTS: tl.constexpr,
    TO_KV: tl.constexpr,
    STREAM: tl.constexpr,  # cache hints for data touched once
):
    # int64 from here on: block * stride and row * slot_words exceed 2**31 in large caches.
    c = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2).to(tl.int64) + first
    page = tl.load(table_ptr + 2 * num_regions + r)
    chunk_start = c * CHUNK
    if chunk_start < page:
        block = tl.load(table_ptr + 4 * num_regions + i)
        if USE_SLOTS:
            row = tl.load(table_ptr + 4 * num_regions + count + i)
        else:
            row = i - row_shift
        kv_start = tl.load(table_ptr + r) + block * tl.load(table_ptr + num_regions + r) + chunk_start
        buf_start = row * slot_words + tl.load(table_ptr + 3 * num_regions + r) + chunk_start
        kv_start = tl.multiple_of(kv_start, ALIGN)
        buf_start = tl.multiple_of(buf_start, ALIGN)
        limit = tl.multiple_of(page - chunk_start, ALIGN)
        for k in tl.static_range(0, CHUNK, STEP):
            offs = k + tl.arange(0, STEP)
            if TO_KV:
                src = buf_ptr + buf_start + offs
                dst = kv_ptr + kv_start + offs
            else:
                src = kv_ptr + kv_start + offs
                dst = buf_ptr + buf_start + offs
            if EVEN:
                if STREAM:
                    words = tl.load(src, eviction_policy="evict_first")
                    tl.store(dst, words, cache_modifier=".cs")
                else:
                    words = tl.load(src)
                    tl.store(dst, words)
            else:
                mask = offs < limit
                if STREAM:
                    words = tl.load(src, mask=mask, eviction_policy="evict_first")
                    tl.store(dst, words, mask=mask, cache_modifier=".cs")
                else:
                    words = tl.load(src, mask=mask)
                    tl.store(dst, words, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_devices(kv: KVRegions, buffer: torch.Tensor, name: str) -> None:
    if kv.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the KV cache is on {kv.device}: the Triton copy needs CUDA (use pegaflow.kernels.reference)")
    if buffer.device.type == "cuda":
        if buffer.device != kv.device:
            raise ValueError(f"{name} is on {buffer.device}, the KV cache on {kv.device}")
    elif buffer.device.type != "cpu":
        raise ValueError(f"{name} is on {buffer.device}: it must be on the KV cache's GPU or in pinned host memory")
    elif kv.device.type == "cuda" and not buffer.is_pinned():
        raise ValueError(f"{name} is in host memory that is not pinned: the GPU cannot reach it")


def _buffer_words(buffer: torch.Tensor, word: int) -> torch.Tensor:
    """The contiguous buffer as a 1-D tensor of ``word``-byte integers (no copy)."""
    raw = buffer.reshape(-1).view(torch.uint8)
    return raw[: raw.numel() // word * word].view(_WORD_DTYPES[word])


def _pow2_part(value: int, cap: int) -> int:
    """The largest power of two dividing ``value`` (0 divides by anything), at most ``cap``."""
    return cap if value == 0 else min(cap, value & -value)


def _upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """One int64 table on ``device``, copied without blocking the host.

    Pinned source: a pageable copy would synchronise the stream on every launch. The caching
    host allocator keeps the pinned block until the copy has completed.
    """
    table = torch.from_numpy(host)
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class _KVLaunch:
    """What every launch on one KV cache needs, for one word width: computed once."""

    anchor_words: torch.Tensor  # word view starting at the lowest region base
    geometry: np.ndarray  # int64 [4 * regions]: base, stride, page, page offset, in words


def _kv_launch(kv: KVRegions, word: int) -> _KVLaunch:
    # Kept in the instance's __dict__ (the dataclass is frozen, its storages never move) so
    # the word view and table are built once per KV cache, not on every launch.
    cache = kv.__dict__.setdefault("_triton_launch", {})
    if word not in cache:
        bases, strides, pages, offsets = kv.geometry
        anchor = min(range(len(bases)), key=bases.__getitem__)
        region = kv.regions[anchor]
        raw = _storage_bytes_view(region.owner)
        usable = (raw.numel() - region.offset) // word * word
        words = raw[region.offset : region.offset + usable].view(_WORD_DTYPES[word])
        geometry = np.array(
            [(b - bases[anchor]) // word for b in bases]
            + [x // word for x in strides]
            + [x // word for x in pages]
            + [x // word for x in offsets],
            dtype=np.int64,
        )
        cache[word] = _KVLaunch(words, geometry)
    return cache[word]


def _kv_alignment(kv: KVRegions) -> tuple[int, int]:
    """(gcd of every base offset from the lowest, stride and page offset; gcd of the pages)."""
    cache = kv.__dict__.setdefault("_triton_alignment", [])
    if not cache:
        bases, strides, pages, offsets = kv.geometry
        low = min(bases)
        cache.append((math.gcd(low, *strides, *offsets, *(b - low for b in bases)), math.gcd(*pages)))
    return cache[0]


@dataclass(frozen=True)
class _Shape:
    """How one KV cache is copied to or from buffers of one alignment: computed once."""

    word: int  # bytes per copied integer
    chunk: int  # words per program
    step: int  # words per load/store step
    align: int  # words every start is a multiple of (the vector hint)
    even: bool  # every page is a whole number of chunks: no mask
    chunks_per_page: int
    num_warps: int
    streaming: bool


def _shape(kv: KVRegions, align: int, tuning: Tuning) -> _Shape:
    """The launch shape for buffers whose addresses and row pitch are multiples of ``align``."""
    kv_align, page_align = _kv_alignment(kv)
    align = math.gcd(align, kv_align)
    word = math.gcd(8, align, page_align)
    # Chunks that divide every page need no mask; else masked chunks of the tuned size.
    even_chunk = _pow2_part(page_align, tuning.chunk_bytes)
    even = even_chunk >= min(MIN_EVEN_CHUNK_BYTES, tuning.chunk_bytes)
    chunk_bytes = even_chunk if even else tuning.chunk_bytes
    vector = _pow2_part(math.gcd(align, chunk_bytes, page_align), VECTOR_BYTES)
    return _Shape(word, chunk_bytes // word, min(tuning.step_bytes, chunk_bytes) // word, max(1, vector // word),
                  even, triton.cdiv(max(kv.geometry[2]), chunk_bytes), tuning.num_warps,
                  tuning.streaming)


def _run_kernel(kv: KVRegions, shape: _Shape, table: torch.Tensor, count: int, first: int, launch_count: int,
                row_shift: int, buffer: torch.Tensor, pitch: int, use_slots: bool, to_kv: bool) -> None:
    """Programs for blocks ``[first, first + launch_count)`` of a table of ``count`` ids."""
    num_regions = len(kv.regions)
    if num_regions > MAX_GRID_YZ:
        raise ValueError(f"a KV cache of {num_regions} regions exceeds the {MAX_GRID_YZ} a launch can address")
    kv_words = _kv_launch(kv, shape.word).anchor_words
    consts = (shape.chunk, shape.step, shape.align, shape.even, use_slots, to_kv, shape.streaming)
    for start in range(first, first + launch_count, MAX_GRID_YZ):
        grid = (shape.chunks_per_page, num_regions, min(MAX_GRID_YZ, first + launch_count - start))
        _launch_variant(grid, kv_words, buffer, table, (num_regions, count, start, row_shift, pitch // shape.word),
                        shape, consts)


# A launch through JITFunction.run binds and specializes every argument again: most of a
# staged chunk's ~64 us launch on the H100 hosts (bench/NOTES.md, sessions 15 and 19), paid
# once per chunk for the same variant. After a variant's first launch its CompiledKernel is
# kept under a key of everything Triton specializes these arguments on (the device, each
# pointer's 16-byte alignment, the values of the ints that are specialized, the constexprs,
# warps and debug; the word dtypes follow from the shape) and launched directly, pointers as
# ints, as JITFunction.run (Triton 3.4 to 3.8) launches it after its own lookup. On an H100
# host it took one chunk's launch from 46.8 to 22.0 us (p50; bench/results/launch_cost-h100.json).
# PEGAFLOW_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("PEGAFLOW_FAST_LAUNCH", "1") != "0"
# The GPU tests set this: each direct launch first asks Triton which variant it would have
# picked and raises if that is not the one the key found.
VERIFY_LAUNCH = os.environ.get("PEGAFLOW_VERIFY_LAUNCH") == "1"
_INT32 = 1 << 31
_compiled: dict[tuple, object] = {}


def _launch_variant(grid: tuple[int, int, int], kv_words: torch.Tensor, buffer: torch.Tensor, table: torch.Tensor,
                    ints: tuple[int, int, int, int, int], shape: _Shape, consts: tuple) -> None:
    num_regions, count, start, row_shift, slot_words = ints
    key = None
    # count, start and row_shift are not specialized, but Triton types them i32 or i64 by value.
    if FAST_LAUNCH and _knobs is not None and not _interpreting() and -_INT32 <= min(count, start, row_shift) \
            and max(count, start, row_shift) < _INT32:
        device = torch.cuda.current_device()
        key = (device, shape, consts, num_regions, slot_words, kv_words.data_ptr() % 16 == 0,
               buffer.data_ptr() % 16 == 0, table.data_ptr() % 16 == 0, _knobs.runtime.debug)
        kernel = _compiled.get(key)
        if kernel is not None:
            if VERIFY_LAUNCH:
                _verify_variant(kernel, grid, kv_words, buffer, table, ints, shape, consts)
            # Host buffers (zero-copy) go as tensors: the launcher then asks the driver for
            # their device address.
            buf = buffer.data_ptr() if buffer.device.type == "cuda" else buffer
            args = (kv_words.data_ptr(), buf, table.data_ptr(), *ints, *consts)
            stream = torch._C._cuda_getCurrentRawStream(device)
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                       kernel.launch_metadata(grid, stream, *args), _knobs.runtime.launch_enter_hook,
                       _knobs.runtime.launch_exit_hook, *args)
            return
    # Bytes past the buffer's last row are never addressed: validation bounded the rows.
    kernel = _copy_pages_kernel[grid](kv_words, _buffer_words(buffer, shape.word), table, *ints,
                                      **_const_kwargs(consts), num_warps=shape.num_warps)
    if key is not None and kernel is not None:
        _compiled[key] = _resolved(kernel)


def _resolved(kernel: object) -> object:
    # Triton's asynchronous compile mode hands out a future; JITFunction.run resolves it too.
    return kernel.result() if hasattr(kernel, "result") else kernel


def _const_kwargs(consts: tuple) -> dict[str, object]:
    return dict(zip(("CHUNK", "STEP", "ALIGN", "EVEN", "USE_SLOTS", "TO_KV", "STREAM"), consts, strict=True))


def _verify_variant(kernel: object, grid: tuple[int, int, int], kv_words: torch.Tensor, buffer: torch.Tensor,
                    table: torch.Tensor, ints: tuple, shape: _Shape, consts: tuple) -> None:
    picked = _copy_pages_kernel.warmup(kv_words, _buffer_words(buffer, shape.word), table, *ints, grid=grid,
                                       **_const_kwargs(consts), num_warps=shape.num_warps)
    if _resolved(picked) is not kernel:
        raise RuntimeError(f"direct launch keyed a kernel variant Triton would not pick (grid {grid}, ints {ints}, "
                           f"consts {consts}): the variant key misses something Triton specializes on")


def _launch(kv: KVRegions, plan: CopyPlan, buffer: torch.Tensor, to_kv: bool, tuning: Tuning) -> None:
    if plan.count == 0:
        return
    # Alignment (bytes) shared by every start address and size of the launch.
    shape = _shape(kv, math.gcd(buffer.data_ptr(), plan.slot_bytes), tuning)
    launch = _kv_launch(kv, shape.word)
    parts = [launch.geometry, plan.block_ids] + ([plan.slot_ids] if plan.slot_ids is not None else [])
    table = _upload(np.concatenate(parts), kv.device)
    _run_kernel(kv, shape, table, plan.count, 0, plan.count, 0, buffer, plan.slot_bytes,
                plan.slot_ids is not None, to_kv)


# Buffers given to launch_rows start at a multiple of this (torch's CUDA allocations start at
# 512 bytes): the shape of a BlockTable's launches can be fixed when the table is made.
ROW_BUFFER_ALIGN = 256


@dataclass(frozen=True, eq=False)
class BlockTable:
    """One transfer's block ids, checked and uploaded once, launched in ranges of rows.

    For a pipeline that moves a transfer in chunks through staging buffers: each chunk is one
    :func:`launch_rows` with no validation of ids and no table upload of its own.
    """

    kv: KVRegions
    count: int
    pitch: int  # bytes from one buffer row to the next (>= kv.block_bytes)
    to_kv: bool
    table: torch.Tensor  # int64 on the KV cache's device: geometry, then block ids
    shape: _Shape


def block_table(kv: KVRegions, block_ids: Ids, pitch: int, *, to_kv: bool,
                tuning: Tuning = DEFAULT_TUNING,
                upload: Callable[[np.ndarray], torch.Tensor | None] | None = None) -> BlockTable:
    """Check ``block_ids`` (in range; unique when writing the KV cache) and upload them.

    ``pitch``: bytes between rows of the buffers to come, a multiple of 16 and at least one block.
    The upload is enqueued on the current stream: launch the table's rows on that stream (or
    one that waits for it), or a launch may read the ids before they have arrived.
    ``upload``: puts the int64 table on the KV cache's device instead of a pinned copy and
    ``.to()`` (e.g. :class:`pegaflow.engine.tables.TableUploader`, bound to the same stream),
    or returns None to leave it to them.
    """
    ids = plan_table(kv, block_ids, pitch, to_kv=to_kv)
    if kv.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the KV cache is on {kv.device}: the Triton copy needs CUDA (use pegaflow.kernels.reference)")
    shape = _shape(kv, math.gcd(ROW_BUFFER_ALIGN, pitch), tuning)
    host = np.concatenate([_kv_launch(kv, shape.word).geometry, ids])
    table = upload(host) if upload is not None and kv.device.type == "cuda" else None
    if table is None:
        table = _upload(host, kv.device)
    return BlockTable(kv, int(ids.size), pitch, to_kv, table, shape)


def warm_up(kv: KVRegions, pitch: int, buffer: torch.Tensor, *, to_kv: bool,
            tuning: Tuning = DEFAULT_TUNING) -> None:
    """Compile the kernel variant that :func:`block_table` ``(kv, ..., pitch, to_kv=to_kv)``
    tables launch on ``buffer``, by one launch that copies nothing: its table gives every
    page a length of 0, so no program loads or stores a byte. Without it the first transfer
    compiles the kernel while its caller waits (0.9-1.9 s for the first staged load on the
    H100, 2026-11-28). Enqueued on the current stream."""
    plan_table(kv, [0], pitch, to_kv=to_kv)  # the checks a real table gets (pitch, regions)
    shape = _shape(kv, math.gcd(ROW_BUFFER_ALIGN, pitch), tuning)
    geometry = _kv_launch(kv, shape.word).geometry.copy()
    regions = len(kv.regions)
    geometry[2 * regions : 3 * regions] = 0  # page lengths
    table = _upload(np.concatenate([geometry, np.zeros(1, dtype=np.int64)]), kv.device)
    launch_rows(BlockTable(kv, 1, pitch, to_kv, table, shape), 0, 1, buffer)


def launch_rows(table: BlockTable, first: int, count: int, buffer: torch.Tensor) -> None:
    """Blocks ``[first, first + count)`` of ``table`` <-> rows ``0 .. count - 1`` of ``buffer``
    (a gather into it, or a scatter from it if the table was made ``to_kv``)."""
    check_rows(table.count, table.pitch, first, count, buffer, ROW_BUFFER_ALIGN)
    _check_devices(table.kv, buffer, "buffer")
    if count:
        _run_kernel(table.kv, table.shape, table.table, table.count, first, count, first, buffer, table.pitch,
                    False, table.to_kv)


def gather(src: KVRegions, block_ids: Ids, dst: torch.Tensor, *, tuning: Tuning = DEFAULT_TUNING) -> None:
    """Copy blocks ``block_ids`` of ``src`` into ``dst``, block-major and contiguous."""
    plan = plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False)
    _check_devices(src, dst, "dst")
    _launch(src, plan, dst, to_kv=False, tuning=tuning)


def gather_into_slots(
    src: KVRegions, block_ids: Ids, dst: torch.Tensor, slot_ids: Ids, slot_bytes: int, *, tuning: Tuning = DEFAULT_TUNING
) -> None:
    """Copy block ``block_ids[i]`` of ``src`` to ``dst`` at byte ``slot_ids[i] * slot_bytes``."""
    plan = plan_copy(src, block_ids, dst, buffer_name="dst", to_kv=False, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _check_devices(src, dst, "dst")
    _launch(src, plan, dst, to_kv=False, tuning=tuning)


def scatter(dst: KVRegions, block_ids: Ids, src: torch.Tensor, *, tuning: Tuning = DEFAULT_TUNING) -> None:
    """Copy the contiguous block-major ``src`` into blocks ``block_ids`` of ``dst``."""
    plan = plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True)
    _check_devices(dst, src, "src")
    _launch(dst, plan, src, to_kv=True, tuning=tuning)


def scatter_from_slots(
    dst: KVRegions, block_ids: Ids, src: torch.Tensor, slot_ids: Ids, slot_bytes: int, *, tuning: Tuning = DEFAULT_TUNING
) -> None:
    """Copy ``src`` at byte ``slot_ids[i] * slot_bytes`` into block ``block_ids[i]`` of ``dst``."""
    plan = plan_copy(dst, block_ids, src, buffer_name="src", to_kv=True, slot_ids=slot_ids, slot_bytes=slot_bytes)
    _check_devices(dst, src, "src")
    _launch(dst, plan, src, to_kv=True, tuning=tuning)
