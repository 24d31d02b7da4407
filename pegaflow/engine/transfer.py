"""Copies between registered KV caches and pool slots: one lane per device (or the CPU).

A GPU lane has a save path and a load path that run at the same time, each on two streams:
an SM stream for the short Triton gathers/scatters and a DMA stream for the copy-engine
copies, through two GPU staging buffers so that gathering chunk k+1 overlaps the DMA of
chunk k (``staged``). ``zero_copy`` has the kernel write (read) the pinned pool directly,
one launch per chunk. ``dma_min_row`` has saves skip the SM: each block's pages go to its slot
as a 2D copy on the copy engines (``dma.strided_plan``). Each path has a launcher thread
that enqueues the work and a completion thread that waits for each job's event and reports
it: the caller never blocks on the GPU, and an entry becomes READY only after its copy has
completed.

A CPU lane copies small jobs by address on the caller's thread and runs the torch reference
copies of larger ones in a thread per direction.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pegaflow.engine import dma
from pegaflow.engine.handle import TransferHandle
from pegaflow.engine.tables import TableUploader
from pegaflow.kernels import KVRegions, copier_for

logger = logging.getLogger(__name__)

SAVE = "save"
LOAD = "load"

# A job is enqueued by the caller itself when nothing is queued on its path and the chunks
# already in flight plus its own stay within INLINE_MAX_CHUNKS (or nothing is in flight): a
# thread hand-off costs more than a small job's launch, and a launcher thread that waits for
# the GIL while the caller books the next job (switch interval 5 ms) leaves the copy engines
# idle (on the H200, 2 GiB DeepSeek saves launched by the thread reached 0.90 of the
# ceiling, their steady state 1.00). The bound keeps the GPU queue short, so the caller
# never blocks on it; a queued job's launches may.
INLINE_MAX_CHUNKS = 64

# On an idle path the engine books and launches a transfer's head apart, then pieces twice as
# long, then its tail: copying starts after the head's bookkeeping, and each piece's
# bookkeeping hides behind the copies of the one before. One 64 MiB chunk carries ~1.2 ms of
# DMA. The tail (on busy paths too) lets the rest's completion bookkeeping overlap its copy.
HEAD_CHUNKS = 2
TAIL_CHUNKS = 2

# Loads of at most this many staging chunks go by 2D DMA (see GpuLane._dma_load_plan), longer
# ones through staging; for a lone load (its transfer found the path idle: a request waits on
# it), LONE_DMA_LOAD_MAX_CHUNKS. Measured on an H100 (2026-12-07, bench/NOTES.md session 16)
# with both at 1 against both at 2: lone 64-block (1K-token) loads, staged, reached
# 0.756-0.806 of the TTFT bound against 0.689-0.775 by 2D DMA (4K: 0.888-0.902 against
# 0.865-0.883), but a matmul in the worker kept 0.887 / 0.896 of its rate beside full-speed
# loads of 128-block jobs whose 64-block pieces (on a busy path) were staged, against 1.003 /
# 1.009 by DMA: the scatters' SM time slices cost the model more than bulk loads gain. So a
# lone load is staged from 2 chunks on, as it was from 3, and a busy path's pieces of up to
# 2 chunks still go by DMA.
DMA_LOAD_MAX_CHUNKS = 2
LONE_DMA_LOAD_MAX_CHUNKS = 1

# Staged transfers' block-id tables go through each path's TableUploader (a pinned ring and
# one reused device buffer, pegaflow.engine.tables) instead of pin_memory() + .to() per piece:
# 17 against 40 us per 300-id table on an H100 host. A/B in one call (H100, 2026-12-07,
# bench/NOTES.md session 19, two interleaved rounds): engine staged saves 0.944 / 0.935 of the
# ceiling against 0.926 / 0.929 (Llama-3-70B TP8) and 0.930 / 0.922 against 0.900 / 0.920
# (Qwen2.5-7B), loads 0.950 / 0.962 against 0.930 / 0.937 and 0.954 / 0.951 against 0.934 /
# 0.934; lone 256 / 640-block loads' engine call 10-15 % shorter; e2e overhead and TTFT within
# the noise of the same call.
TABLE_RING = True

# A block at least this long in one contiguous run (block-first layouts, BLNHC / BLHNC: every
# layer's page of a block back to back) loads by the copy engines alone at any length, so the
# server runs no SM work for it. On an H100 (2026-11-28, bench/engine.py, 512 blocks of
# Llama-3-8B BLNHC, one run) such loads moved 48.2 GB/s between first and last completion
# against 47.1 staged, 45.9 against 38.9 wall to wall. Neither reaches PCIe speed: the copy
# engine spends ~3 us on each copy, 1D or 2D (2 MiB per-block copies 49.5-49.8 GB/s against
# 53.8 for one copy of the same bytes). Consecutive blocks in consecutive slots go as one copy.
WHOLE_BLOCK_DMA_BYTES = 256 << 10

# The copies of one direct (2D DMA) job go round robin over this many streams of its path, so
# that several copy engines could overlap each copy's start (~3 us, see WHOLE_BLOCK_DMA_BYTES);
# a job of fewer blocks than streams splits each block's rows over them. Not shown to help, so
# off: on one H100 (2026-12-07, bench/dma_streams.py) 640-block Llama-3-8B loads after an idle
# gap reached 0.902 / 0.910 of a contiguous copy on 1 / 2 streams, 256-block saves 0.916 /
# 0.915 on 2 / 4 (rows split over 2 / 4 streams: 0.855 / 0.764), and the end-to-end overhead
# and TTFT figures of 1, 2 and 4 streams differed by less than the host's run-to-run spread
# (bench/NOTES.md, session 13). The lone one-block split is yet to be measured alone.
DMA_STREAMS = 1

# Completion events of jobs up to this size spin-wait (about 0.3 ms of copy at most); larger
# jobs' block. Measured on the H200 (bench/roundtrip.py --profile, 1-block jobs): spinning
# events took 40-120 us off a save's or a load's round trip.
SPIN_MAX_BYTES = 16 << 20

# A job longer than SPIN_MAX_BYTES of a transfer that began on an idle path (``CopyJob.lone``:
# a lone prompt's load, which a request waits on) is waited for in two steps: the completer
# blocks on an event recorded where at most SPIN_MAX_BYTES of the job's copies are left (before
# its last staging chunk's DMA, or before its last 2D copies), then spins on a second event
# recorded beside the job's own. The end is seen within microseconds instead of after a
# blocking wait's wake-up (which the rest of the copy hides), and the thread holds a core for
# the last piece only. Jobs of busy paths (bulk transfers, queued behind others) block as
# before. On the H100 (bench/lone_latency.py, lone 64-block Llama-3-8B loads in process) the
# host's part beyond the GPU span fell from 155 to 55 us, a save's from 283 to 166 us; the
# server A/B (bench/e2e.py overhead and TTFT phases, two rounds each) is in bench/NOTES.md,
# session 12.
LATE_SPIN = True

# A job of at most this many bytes that finds its path idle completes on the caller's thread:
# it is launched, its (spinning) event waited on without the GIL, and its bookkeeping done
# there, not handed to the completer thread, which would then have to wake the server's loop
# to push the completion (~70-80 us a hop on the H100 host, bench/NOTES.md session 7). The
# caller blocks for the copy: ~40 us for 2 MiB. A save whose producer event has not completed
# (its forward still runs) never completes inline. On the H100's server (bench/e2e.py, two
# rounds, with LATE_SPIN) a 1-block load's overhead p50 went from 862-892 to 602-666 us, a
# save's from 492-602 to 306-340 us (bench/NOTES.md, session 12).
SYNC_MAX_BYTES = 4 << 20

# A CPU job of at most this many pages (blocks x regions) is copied by address, one memmove
# each (~1 us), on the caller's thread when its direction is idle: a thread hand-off and the
# torch reference's per-region indexing (~200 us for one block) cost more than such a copy.
CPU_INLINE_PAGES = 256

# The save and load launchers of every lane enqueue Triton kernels from their own threads;
# Triton's JIT cache (first-call compilation) is not documented as thread-safe, and a launch
# takes microseconds, so launches take turns.
_KERNEL_LOCK = threading.Lock()


@dataclass(eq=False)
class CopyJob:
    """Blocks ``block_ids[j]`` of ``kv`` <-> the pool slot at byte ``offsets[j]``."""

    direction: str
    kv: KVRegions
    block_ids: list[int]
    offsets: list[int]
    slot_bytes: int
    handle: TransferHandle
    finish: Callable[[bool, str | None], None]  # engine bookkeeping; completes the handle
    after_event: Any = None
    lone: bool = False  # its transfer began on an idle path: someone waits on it (see LATE_SPIN)


class _Near:
    """A lone long job's two waits (see LATE_SPIN): a blocking event the copy routine records
    where at most SPIN_MAX_BYTES are left (a staged one: before its last chunk), and a spinning
    one beside the job's end. Where none is recorded (one staging chunk) the wait spins throughout."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(blocking=True)
        self.recorded = False
        self.end = torch.cuda.Event(blocking=False)

    def mark(self, stream: Any) -> None:
        if not self.recorded:
            self.event.record(stream)
            self.recorded = True

    def wait(self) -> None:
        if self.recorded:
            self.event.synchronize()  # sleeps through most of the copy
        self.end.synchronize()  # spins through the rest


@dataclass(frozen=True)
class Piece:
    """Blocks ``[first, first + count)`` of a job, in consecutive slots from ``offset``."""

    first: int
    offset: int
    count: int


def runs(offsets: list[int], slot_bytes: int, max_count: int) -> list[tuple[int, int, int]]:
    """``(first, offset, count)`` of each run of consecutive slots, also cut at every multiple of
    ``max_count`` blocks; numpy finds the breaks (512 blocks: ~20 us, a Python loop ~200)."""
    n = len(offsets)
    if n == 0:
        return []
    if n <= 32:  # numpy's per-call cost exceeds the loop's below this
        out: list[tuple[int, int, int]] = []
        start = 0
        for j in range(1, n + 1):
            if j == n or offsets[j] != offsets[j - 1] + slot_bytes or j % max_count == 0:
                out.append((start, offsets[start], j - start))
                start = j
        return out
    first = offsets[0]
    if offsets[-1] - first == (n - 1) * slot_bytes and offsets == list(range(first, first + n * slot_bytes, slot_bytes)):
        # One run, as the allocator gives when it can: cut at the chunk boundaries only.
        return [(a, first + a * slot_bytes, min(max_count, n - a)) for a in range(0, n, max_count)]
    at = np.asarray(offsets, dtype=np.int64)
    cut = np.diff(at) != slot_bytes
    cut |= (np.arange(1, n) % max_count) == 0
    starts = [0, *(np.flatnonzero(cut) + 1).tolist()]
    ends = starts[1:] + [n]
    return [(a, offsets[a], b - a) for a, b in zip(starts, ends)]


def block_runs(block_ids: list[int], offsets: list[int], slot_bytes: int) -> list[tuple[int, int, int]]:
    """``(block, offset, count)`` of each run of consecutive blocks in consecutive slots: where
    a block is one contiguous run that fills its stride and its slot, such a run is one copy."""
    n = len(block_ids)
    if n <= 32:
        out: list[tuple[int, int, int]] = []
        start = 0
        for j in range(1, n + 1):
            if j == n or block_ids[j] != block_ids[j - 1] + 1 or offsets[j] != offsets[j - 1] + slot_bytes:
                out.append((block_ids[start], offsets[start], j - start))
                start = j
        return out
    ids, at = np.asarray(block_ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    cut = (np.diff(ids) != 1) | (np.diff(at) != slot_bytes)
    starts = [0, *(np.flatnonzero(cut) + 1).tolist()]
    ends = starts[1:] + [n]
    return [(block_ids[a], offsets[a], b - a) for a, b in zip(starts, ends)]


def _whole_run(plan: tuple[dma.Rows, ...], block_stride: int, slot_bytes: int) -> bool:
    """Each block fills its stride in the KV cache and its slot in the pool: one run each."""
    return (len(plan) == 1 and plan[0].contiguous and plan[0].dst == 0
            and plan[0].run_bytes == block_stride == slot_bytes)


def _whole_blocks(plan: tuple[dma.Rows, ...], min_bytes: int) -> bool:
    """Each block is one contiguous run of at least ``min_bytes``."""
    return len(plan) == 1 and plan[0].contiguous and plan[0].run_bytes >= min_bytes


def pieces(offsets: list[int], slot_bytes: int, max_count: int) -> list[Piece]:
    """A job's slots as runs of consecutive slots, cut at every multiple of ``max_count`` blocks."""
    return [Piece(*run) for run in runs(offsets, slot_bytes, max_count)]


def chunk_runs(offsets: list[int], slot_bytes: int, max_count: int) -> list[tuple[int, int, list[Piece]]]:
    """``(first, count, pieces)`` of each chunk: blocks ``[k * max_count, ...)`` at most ``max_count``."""
    out: list[tuple[int, int, list[Piece]]] = []
    for piece in pieces(offsets, slot_bytes, max_count):
        first = piece.first - piece.first % max_count
        if not out or out[-1][0] != first:
            out.append((first, 0, []))
        out[-1][2].append(piece)
    return [(first, sum(p.count for p in parts), parts) for first, _, parts in out]


class _Worker:
    """One thread running queued callables in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._busy = 0  # items queued or running
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Callable[[], None]) -> None:
        with self._count_lock:
            self._busy += 1
        self._queue.put(item)

    def idle(self) -> bool:
        """Nothing queued or running (a snapshot: another thread may put an item next)."""
        return self._busy == 0

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                item()
            except Exception:  # a bug in bookkeeping must not stop the lane
                logger.exception("engine worker %s: task failed", self._thread.name)
            finally:
                with self._count_lock:
                    self._busy -= 1


def _wait_for_producer(job: CopyJob, stream: torch.cuda.Stream) -> None:
    """Order the save's reads after the forward that wrote its blocks. A producer event that
    has already completed (asked on the host, ~1 us) needs no GPU-side wait, which may need
    this process's context on the compute engine and so a switch away from the model's
    (suspected: on the H200 a matmul loop kept 0.947 of its rate beside DMA-only saves that
    waited, 1.006 in a two-process probe whose saves did not wait)."""
    event = job.after_event
    if event is not None and not event.query():
        stream.wait_event(event)


def _fail(job: CopyJob, exc: BaseException) -> None:
    logger.error("%s of %d blocks failed: %s", job.direction, len(job.block_ids), exc)
    job.finish(False, f"{type(exc).__name__}: {exc}")


class CpuLane:
    """Copies between CPU KV caches and the (unpinned) pool.

    A small job (at most CPU_INLINE_PAGES pages) whose direction has nothing queued is copied
    by address on the caller's thread: in the server that is the loop, which then pushes the
    completion at once, with no thread hand-off and no wake-up. Larger jobs go to the
    direction's thread and the torch reference copies.
    """

    def __init__(self, pool: torch.Tensor) -> None:
        self._pool = pool
        self._pool_ptr = pool.data_ptr()
        self._workers = {SAVE: _Worker("pegaflow-cpu-save"), LOAD: _Worker("pegaflow-cpu-load")}

    def submit(self, job: CopyJob) -> None:
        worker = self._workers[job.direction]
        if len(job.offsets) * len(job.kv.regions) <= CPU_INLINE_PAGES and worker.idle():
            self._run(job, inline=True)
        else:
            worker.put(lambda: self._run(job))

    def head_blocks(self, direction: str, slot_bytes: int) -> int | None:
        """Blocks the engine may book and submit apart at each end (None: all at once)."""
        return None

    def tail_blocks(self, direction: str, slot_bytes: int) -> int | None:
        """Blocks the engine may book and submit apart at the end of a busy path's transfer."""
        return None

    def _run(self, job: CopyJob, inline: bool = False) -> None:
        try:
            if inline:
                self._copy_pages(job)
            else:
                self._copy_reference(job)
        except Exception as exc:
            _fail(job, exc)
            return
        job.finish(True, None)

    def _copy_pages(self, job: CopyJob) -> None:
        """One memmove per (block, region) page; everything checked first, as the kernels do."""
        kv, ids, offsets, slot = job.kv, job.block_ids, job.offsets, job.slot_bytes
        bases, strides, pages, page_offsets = kv.geometry
        if not ids:
            return
        if len(ids) != len(offsets) or min(ids) < 0 or max(ids) >= kv.num_blocks:
            raise ValueError(f"block ids {min(ids)}..{max(ids)} (x{len(ids)}) for {len(offsets)} slots: "
                             f"out of range [0, {kv.num_blocks}) or not one per slot")
        if min(offsets) < 0 or max(offsets) + slot > self._pool.numel() or kv.block_bytes > slot:
            raise ValueError(f"slot offsets {min(offsets)}..{max(offsets)} (+{slot}) fall outside the pool's "
                             f"{self._pool.numel()} bytes, or a slot is smaller than a block ({kv.block_bytes})")
        geometry = list(zip(bases, strides, pages, page_offsets))
        pool, move, save = self._pool_ptr, ctypes.memmove, job.direction == SAVE
        for block, offset in zip(ids, offsets):
            at = pool + offset
            for base, stride, page, page_offset in geometry:
                if save:
                    move(at + page_offset, base + block * stride, page)
                else:
                    move(base + block * stride, at + page_offset, page)

    def _copy_reference(self, job: CopyJob) -> None:
        from pegaflow.kernels import reference

        for p in pieces(job.offsets, job.slot_bytes, len(job.offsets)):
            ids = job.block_ids[p.first : p.first + p.count]
            dst = self._pool[p.offset : p.offset + p.count * job.slot_bytes]
            slots = list(range(p.count))
            if job.direction == SAVE:
                reference.gather_into_slots(job.kv, ids, dst, slots, job.slot_bytes)
            else:
                reference.scatter_from_slots(job.kv, ids, dst, slots, job.slot_bytes)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()


class _Path:
    """One direction of a GPU lane: its streams, staging buffers, launcher and completer."""

    def __init__(self, direction: str, device: torch.device, staging_bytes: int, dma_streams: int = 1) -> None:
        self.direction = direction
        self.device = device
        self.sm = torch.cuda.Stream(device)
        self.dma = torch.cuda.Stream(device)
        # More streams for a job's direct copies (DMA_STREAMS): forked from and joined back
        # into ``dma`` by these events, reused under the launch lock (a wait binds to the
        # record before it).
        self.more_dma = [torch.cuda.Stream(device) for _ in range(dma_streams - 1)]
        self.fork = torch.cuda.Event()
        self.join = [torch.cuda.Event() for _ in self.more_dma]
        self.half = max(1, staging_bytes // 2)
        self.staging: list[torch.Tensor] = []
        # ready[b]: buffer b's producer finished; free[b]: its consumer finished (reusable).
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]
        self.launcher = _Worker(f"pegaflow-{direction}-launch-{device.index}")
        self.completer = _Worker(f"pegaflow-{direction}-done-{device.index}")
        # Launches of this path never interleave (they share the staging halves and events).
        self.launch_lock = threading.Lock()
        self.tables = TableUploader(device, self.sm)  # used under launch_lock
        self.state_lock = threading.Lock()
        self.backlog = 0  # jobs handed to the launcher thread and not yet launched
        self.inflight = 0  # chunks launched and not yet completed

    def buffers(self, slot_bytes: int) -> list[torch.Tensor]:
        """The two staging halves, grown (after draining) if one slot does not fit."""
        need = max(self.half, slot_bytes)
        if not self.staging or self.staging[0].numel() < need:
            self.sm.synchronize()
            self.dma.synchronize()
            self.staging = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(2)]
            if need > self.half:
                logger.warning("staging half grown to %d bytes: one block is larger than staging_bytes / 2", need)
        return self.staging

    def close(self) -> None:
        self.launcher.close()
        self.completer.close()


class GpuLane:
    """Saves and loads for the KV caches of one CUDA device."""

    def __init__(self, device: int, pool: torch.Tensor, staging_bytes: int, zero_copy: bool,
                 dma_min_row: int | None = None, sync_max_bytes: int = SYNC_MAX_BYTES,
                 late_spin: bool = LATE_SPIN, dma_streams: int | None = None) -> None:
        dma_streams = DMA_STREAMS if dma_streams is None else dma_streams
        if dma_streams < 1:
            raise ValueError(f"dma_streams must be at least 1, got {dma_streams}")
        self.device = torch.device("cuda", device)
        self._sync_max_bytes = sync_max_bytes
        self._late_spin = late_spin  # False: lone long jobs block like the others
        self._pool = pool
        self._zero_copy = zero_copy
        # Saves by the copy engines alone where the KV cache's pages line up as strided rows
        # (every vLLM layout does) at least dma_min_row bytes wide; others go through staging.
        self._dma_min_row = None if zero_copy else dma_min_row
        self._copier = copier_for(self.device)
        self._dma = dma.copy_async  # (dst address, src address, bytes, stream handle)
        # One descriptor per path: each is used under its path's launch lock only.
        self._copy_2d = {d: dma.Copier2D().copy for d in (SAVE, LOAD)} if self._dma_min_row is not None else {}
        self._plans: dict[tuple, tuple[dma.Rows, ...] | None] = {}  # by KVRegions.geometry
        with torch.cuda.device(self.device):
            self._paths = {d: _Path(d, self.device, staging_bytes, dma_streams) for d in (SAVE, LOAD)}

    def head_blocks(self, direction: str, slot_bytes: int) -> int | None:
        """HEAD_CHUNKS staging chunks' worth of blocks if the path is idle (the engine then
        submits the first and last ones apart, so copying starts and completes sooner), else
        None."""
        path = self._paths[direction]
        with path.state_lock:
            idle = path.inflight == 0 and path.backlog == 0
        return HEAD_CHUNKS * self._per_chunk(path, slot_bytes) if idle else None

    def tail_blocks(self, direction: str, slot_bytes: int) -> int | None:
        """TAIL_CHUNKS staging chunks' worth of blocks: a transfer's last piece, booked apart
        so that the rest's completion bookkeeping overlaps its copy."""
        return TAIL_CHUNKS * self._per_chunk(self._paths[direction], slot_bytes)

    def warm_up(self, kv: KVRegions, slot_bytes: int, label: str = "") -> None:
        """Compile, in the background, the copy kernels that transfers of ``kv`` will launch
        (each path's launcher thread, which launches nothing else while it runs): the first
        staged transfer would otherwise wait ~1-2 s for Triton, with the server's loop (its
        caller) and every other client behind it."""
        if self._zero_copy:
            return
        # Saves that go by the copy engines alone launch no kernel; loads longer than a
        # transfer tail are staged unless each block is one long run.
        plan = self._dma_plan(kv)
        for direction, path in self._paths.items():
            if plan is None or (direction == LOAD and not _whole_blocks(plan, WHOLE_BLOCK_DMA_BYTES)):
                path.launcher.put(lambda path=path: self._warm_up(path, kv, slot_bytes, label))

    def _warm_up(self, path: _Path, kv: KVRegions, slot_bytes: int, label: str) -> None:
        start = time.perf_counter()
        try:
            with path.launch_lock, torch.cuda.device(self.device), torch.cuda.stream(path.sm):
                staging = path.buffers(slot_bytes)
                with _KERNEL_LOCK:
                    self._copier.warm_up(kv, slot_bytes, staging[0], to_kv=path.direction == LOAD)
        except Exception as exc:  # the first transfer compiles instead (and reports what fails)
            logger.warning("%s: could not compile the %s kernel ahead: %s", label, path.direction, exc)
            return
        logger.info("%s: %s kernel ready in %.2f s", label, path.direction, time.perf_counter() - start)

    def new_event(self, nbytes: int = 1 << 62) -> torch.cuda.Event:
        """The completion event of a job of ``nbytes``: a short job's spins (the completion
        thread sees its end within microseconds, not after an interrupt's wake-up), a longer
        one's blocks, so that the thread sleeps through the copy instead of holding a core."""
        return torch.cuda.Event(blocking=nbytes > SPIN_MAX_BYTES)

    def submit(self, job: CopyJob) -> None:
        """Enqueue the job's copies: on the caller's thread when nothing is queued and the GPU
        queue is short (see INLINE_MAX_CHUNKS), else on the launcher thread, in order. An
        inline caller may wait for a launch already in progress (a few milliseconds at most),
        never for the GPU."""
        path = self._paths[job.direction]
        chunks = -(-len(job.offsets) // self._per_chunk(path, job.slot_bytes))
        with path.state_lock:
            inline = path.backlog == 0 and (path.inflight == 0 or path.inflight + chunks <= INLINE_MAX_CHUNKS)
            if not inline:
                path.backlog += 1
        if inline:
            sync = (len(job.offsets) * job.slot_bytes <= self._sync_max_bytes
                    and (job.after_event is None or job.after_event.query()))
            if self._launch(path, job, chunks, sync=sync):
                try:
                    self._complete(path, job, job.handle._event, chunks)
                except Exception:  # as on the completer thread: a bookkeeping bug must not reach the caller
                    logger.exception("engine: completing a %s inline failed", job.direction)
        else:
            path.launcher.put(lambda: self._launch(path, job, chunks, queued=True))

    def close(self) -> None:
        for path in self._paths.values():
            path.close()

    def _launch(self, path: _Path, job: CopyJob, chunks: int, queued: bool = False, sync: bool = False) -> bool:
        """Enqueue the job's copies. With ``sync``, if nothing else is in flight on the path
        (so its streams hold this job alone), returns True: the caller completes the job
        (:meth:`_complete`) after the launch lock is released; else its completer does."""
        with path.launch_lock:
            with path.state_lock:
                sync = sync and path.inflight == 0
                path.inflight += chunks
                if queued:
                    path.backlog -= 1
            return self._launch_locked(path, job, chunks, sync)

    def _done(self, path: _Path, chunks: int) -> None:
        with path.state_lock:
            path.inflight -= chunks

    def _launch_locked(self, path: _Path, job: CopyJob, chunks: int, sync: bool = False) -> bool:
        event = job.handle._event
        # Not for a save still waiting on its forward (a 10K-token prefill: ~0.3 s): its copy's
        # start is unknown, and the near event would fire while its own copies had yet to run.
        near = (_Near() if self._late_spin and job.lone and not sync and not self._zero_copy
                and len(job.offsets) * job.slot_bytes > SPIN_MAX_BYTES
                and (job.after_event is None or job.after_event.query()) else None)
        try:
            with torch.cuda.device(self.device):
                if self._zero_copy:
                    self._zero_copy_job(path, job)
                    end = path.sm
                elif job.direction == SAVE:
                    plan = self._dma_plan(job.kv)
                    if plan is not None:
                        self._dma_copy(path, job, plan, near)
                    else:
                        self._staged_save(path, job, near)
                    end = path.dma
                else:
                    plan = self._dma_load_plan(path, job)
                    if plan is not None:
                        self._dma_copy(path, job, plan, near)
                        end = path.dma
                    else:
                        self._staged_load(path, job, near)
                        end = path.sm
                event.record(end)
                if near is not None:
                    near.end.record(end)
        except Exception as exc:
            # Some chunks may be enqueued: report the failure only once they are done.
            with torch.cuda.device(self.device):
                path.dma.wait_stream(path.sm)
                event.record(path.dma)
            job.handle._mark_launched()
            path.completer.put(lambda exc=exc: (event.synchronize(), self._done(path, chunks), _fail(job, exc)))
            return False
        job.handle._mark_launched()
        if sync:
            return True
        path.completer.put(lambda: self._complete(path, job, event, chunks, near))
        return False

    def _complete(self, path: _Path, job: CopyJob, event: torch.cuda.Event, chunks: int,
                  near: _Near | None = None) -> None:
        try:
            if near is None:
                event.synchronize()
            else:
                near.wait()
        except Exception as exc:
            self._done(path, chunks)
            _fail(job, exc)
            return
        self._done(path, chunks)
        job.finish(True, None)

    def _per_chunk(self, path: _Path, slot_bytes: int) -> int:
        return max(1, path.half // slot_bytes)

    def _block_table(self, path: _Path, job: CopyJob, to_kv: bool) -> Any:
        """The job's checked ids on the device, uploaded on the current stream (the path's SM)."""
        return self._copier.block_table(job.kv, job.block_ids, job.slot_bytes, to_kv=to_kv,
                                        upload=path.tables.upload if TABLE_RING else None)

    def _check_slots(self, job: CopyJob) -> None:
        """The DMAs take raw addresses: every slot must lie inside the pool."""
        if job.offsets and (min(job.offsets) < 0 or max(job.offsets) + job.slot_bytes > self._pool.numel()):
            raise ValueError(f"slot offsets {min(job.offsets)}..{max(job.offsets)} (+{job.slot_bytes}) fall "
                             f"outside the pool's {self._pool.numel()} bytes")

    def _staged_save(self, path: _Path, job: CopyJob, near: _Near | None = None) -> None:
        self._check_slots(job)
        slot = job.slot_bytes
        staging = path.buffers(slot)
        per_chunk = self._per_chunk(path, slot)
        rows = [t.data_ptr() for t in staging]
        pool, stream = self._pool.data_ptr(), path.dma.cuda_stream
        # One current-stream switch per job: the table upload and the launches run on the SM
        # stream; the DMAs name their stream. The engine checked the ids; the table checks
        # them once more and uploads them once, so each chunk is one launch with no
        # validation or upload of its own.
        with torch.cuda.stream(path.sm):
            table = self._block_table(path, job, to_kv=False)
            _wait_for_producer(job, path.sm)
            work = chunk_runs(job.offsets, slot, per_chunk)
            for k, (first, count, parts) in enumerate(work):
                b = k % 2
                path.sm.wait_event(path.free[b])
                with _KERNEL_LOCK:
                    self._copier.launch_rows(table, first, count, staging[b])
                path.ready[b].record(path.sm)
                if near is not None and k == len(work) - 1 and k:
                    near.mark(path.dma)  # the chunk before the last is out
                path.dma.wait_event(path.ready[b])
                for p in parts:
                    self._dma(pool + p.offset, rows[b] + (p.first - first) * slot, p.count * slot, stream)
                path.free[b].record(path.dma)

    def _dma_plan(self, kv: KVRegions) -> tuple[dma.Rows, ...] | None:
        """How a save goes by the copy engines alone, or None for staging (rows narrower than
        ``dma_min_row``). Also while loads run: end to end on the H200 (2026-11-27, A/B in one
        call, two rounds), saves and loads at once reached 0.781 / 0.794 of the two-direction
        ceiling with 2D DMA saves beside the loads against 0.766 / 0.759 with saves staged
        whenever a load was in flight (session 3 had measured the opposite, 0.79 vs 0.88, on
        older code); with loads started first, staged saves beside them ran at ~33-37 GB/s."""
        if self._dma_min_row is None:
            return None
        return self._plan(kv)

    def _dma_load_plan(self, path: _Path, job: CopyJob) -> tuple[dma.Rows, ...] | None:
        """Loads of up to DMA_LOAD_MAX_CHUNKS staging chunks (a lone one's:
        LONE_DMA_LOAD_MAX_CHUNKS) go by the copy engines alone, with no SM work in this
        process to take time slices from the model's; longer ones are staged, whose copies
        run at 0.97-0.98 of PCIe against 2D DMA's 0.93 with 64 KiB rows (a staged load's first
        DMA needs no id table, so its launch hides behind that copy). A busy path's short
        pieces (a long load's tail) are such loads. Blocks that are one contiguous run of at
        least WHOLE_BLOCK_DMA_BYTES go by the copy engines at any length."""
        if self._dma_min_row is None:
            return None
        plan = self._plan(job.kv)
        if plan is not None and _whole_blocks(plan, WHOLE_BLOCK_DMA_BYTES):
            return plan
        most = LONE_DMA_LOAD_MAX_CHUNKS if job.lone else DMA_LOAD_MAX_CHUNKS
        if len(job.offsets) > most * self._per_chunk(path, job.slot_bytes):
            return None
        return plan

    def _plan(self, kv: KVRegions) -> tuple[dma.Rows, ...] | None:
        key = kv.geometry
        if key not in self._plans:
            plan = dma.strided_plan(kv.geometry)
            if plan is None:
                logger.info("KV regions do not line up as strided rows: saves of this cache go through staging")
            elif min(r.run_bytes for r in plan) < self._dma_min_row:
                logger.info("KV rows of %d bytes are narrower than %d: saves of this cache go through staging",
                            min(r.run_bytes for r in plan), self._dma_min_row)
                plan = None
            self._plans[key] = plan
        return self._plans[key]

    def _dma_copy(self, path: _Path, job: CopyJob, plan: tuple[dma.Rows, ...], near: _Near | None = None) -> None:
        """Each block's pages straight to (from) its slot, one 2D copy per row set: no SM work."""
        self._check_slots(job)
        if job.direction == SAVE:
            _wait_for_producer(job, path.dma)
        whole = _whole_run(plan, job.kv.regions[0].block_stride, job.slot_bytes)
        more = path.more_dma if len(job.block_ids) > 1 or not whole else []
        if more:
            path.fork.record(path.dma)
            for s in more:
                s.wait_event(path.fork)
        try:
            self._dma_enqueue(path, job, plan, near, [path.dma.cuda_stream] + [s.cuda_stream for s in more], whole)
        finally:  # copies enqueued before a failure still join the job's stream
            for s, e in zip(more, path.join):
                e.record(s)
                path.dma.wait_event(e)

    def _dma_enqueue(self, path: _Path, job: CopyJob, plan: tuple[dma.Rows, ...], near: _Near | None,
                     handles: list[int], whole: bool) -> None:
        """The copies of :meth:`_dma_copy`, round robin over the stream ``handles``."""
        stride = job.kv.regions[0].block_stride
        pool = self._pool.data_ptr()
        copy_2d, copy_1d = self._copy_2d[job.direction], self._dma
        save = job.direction == SAVE
        n = len(handles)
        if whole:  # consecutive blocks in consecutive slots are one run on both sides, one copy
            base, size = plan[0].src, job.slot_bytes
            left = len(job.block_ids) * size  # bytes not yet enqueued
            for i, (b, off, count) in enumerate(block_runs(job.block_ids, job.offsets, size)):
                if near is not None and left <= SPIN_MAX_BYTES:
                    near.mark(path.dma)
                left -= count * size
                kv, slot, stream = base + b * stride, pool + off, handles[i % n]
                if save:
                    copy_1d(slot, kv, count * size, stream)
                else:
                    copy_1d(kv, slot, count * size, stream)
            return
        left = len(job.block_ids) * sum(r.width * r.height for r in plan)
        c = 0  # copies enqueued: the next goes to handles[c % n]
        for rows in plan:
            step = rows.width * rows.height
            # Fewer blocks than streams: each block's rows are split over the streams.
            parts = 1 if rows.contiguous or len(job.block_ids) >= n else min(n, rows.height)
            for b, off in zip(job.block_ids, job.offsets):
                if near is not None and left <= SPIN_MAX_BYTES:
                    near.mark(path.dma)
                left -= step
                kv, slot = rows.src + b * stride, pool + off + rows.dst
                if rows.contiguous:
                    dst, src = (slot, kv) if save else (kv, slot)
                    copy_1d(dst, src, rows.run_bytes, handles[c % n])
                    c += 1
                    continue
                for j in range(parts):
                    first, end = rows.height * j // parts, rows.height * (j + 1) // parts
                    k, h = kv + first * rows.src_pitch, slot + first * rows.dst_pitch
                    dst, dst_pitch, src, src_pitch = (
                        (h, rows.dst_pitch, k, rows.src_pitch) if save else (k, rows.src_pitch, h, rows.dst_pitch))
                    copy_2d(dst, dst_pitch, src, src_pitch, rows.width, end - first, handles[c % n])
                    c += 1

    def _staged_load(self, path: _Path, job: CopyJob, near: _Near | None = None) -> None:
        self._check_slots(job)
        slot = job.slot_bytes
        staging = path.buffers(slot)
        work = chunk_runs(job.offsets, slot, self._per_chunk(path, slot))
        rows = [t.data_ptr() for t in staging]
        pool, stream = self._pool.data_ptr(), path.dma.cuda_stream

        def copy(k: int) -> None:
            b, (first, _, parts) = k % 2, work[k]
            if near is not None and k == len(work) - 1 and k:
                near.mark(path.dma)  # the chunk before the last is in
            path.dma.wait_event(path.free[b])
            for p in parts:
                self._dma(rows[b] + (p.first - first) * slot, pool + p.offset, p.count * slot, stream)
            path.ready[b].record(path.dma)

        def scatter(k: int) -> None:
            b, (first, count, _) = k % 2, work[k]
            path.sm.wait_event(path.ready[b])
            with _KERNEL_LOCK:
                self._copier.launch_rows(table, first, count, staging[b])
            path.free[b].record(path.sm)

        if not work:
            return
        # The first chunk's DMA needs no id table: enqueued first, the copy engine starts at
        # once and the table's upload and the first scatter's launch hide behind it.
        copy(0)
        with torch.cuda.stream(path.sm):  # the upload and the scatters: SM stream
            table = self._block_table(path, job, to_kv=True)
            # DMA k+1 is enqueued before scatter k, so the copy engine always has the next
            # chunk queued even if enqueueing a scatter blocks this thread.
            for k in range(1, len(work)):
                copy(k)
                scatter(k - 1)
            scatter(len(work) - 1)

    def _zero_copy_job(self, path: _Path, job: CopyJob) -> None:
        slot = job.slot_bytes
        _wait_for_producer(job, path.sm)
        with torch.cuda.stream(path.sm):
            for p in pieces(job.offsets, slot, self._per_chunk(path, slot)):
                ids = job.block_ids[p.first : p.first + p.count]
                view = self._pool[p.offset : p.offset + p.count * slot]
                slots = list(range(p.count))
                with _KERNEL_LOCK:
                    if job.direction == SAVE:
                        self._copier.gather_into_slots(job.kv, ids, view, slots, slot)
                    else:
                        self._copier.scatter_from_slots(job.kv, ids, view, slots, slot)
