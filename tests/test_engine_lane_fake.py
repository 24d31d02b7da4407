"""The GPU lane's pipeline logic (chunks, staging halves, slot runs, event plumbing) on the
CPU: CUDA streams and events are replaced by stand-ins that run everything in order, and the
Triton copier by the torch reference. The real thing runs in tests/test_engine_gpu.py."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading

import pytest
import torch

from pegaflow.engine.handle import TransferHandle
from pegaflow.engine import transfer
from pegaflow.engine.transfer import LOAD, SAVE, CopyJob, GpuLane
from pegaflow.kernels import reference
from pegaflow.kernels.layouts import allocate_attention_kv_cache


class FakeEvent:
    def __init__(self, *args, **kwargs) -> None:
        self.recorded = 0
        self.complete = False  # a producer's event: its forward still runs

    def query(self) -> bool:
        return self.complete

    def record(self, stream=None) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        pass


class FakeStream:
    handles = itertools.count(1)

    def __init__(self, *args, **kwargs) -> None:
        self.waited: list[object] = []
        self.cuda_stream = next(self.handles)

    def wait_event(self, event) -> None:
        self.waited.append(event)

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeCopier2D:
    """cuMemcpy2DAsync on host memory: one memmove per row."""

    streams: list[int] = []  # the stream handle of every copy, in order

    def copy(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:
        self.streams.append(stream)
        for i in range(height):
            ctypes.memmove(dst + i * dst_pitch, src + i * src_pitch, width)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(transfer.dma, "Copier2D", FakeCopier2D)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def make_lane(pool: torch.Tensor, staging_bytes: int, zero_copy: bool, dma_min_row: int | None = None,
              dma_streams: int = 1) -> GpuLane:
    lane = GpuLane(0, pool, staging_bytes, zero_copy, dma_min_row, dma_streams=dma_streams)
    lane._copier = reference
    lane._dma = lambda dst, src, nbytes, stream: ctypes.memmove(dst, src, nbytes)  # host memory: a plain copy
    for path in lane._paths.values():
        path.device = torch.device("cpu")
    return lane


def run(lane: GpuLane, direction: str, kv, block_ids, offsets, slot: int, after_event=None,
        lone: bool = False) -> tuple[bool, str | None]:
    done = threading.Event()
    outcome: list = []
    handle = TransferHandle(FakeEvent())

    def finish(ok, error):
        outcome.append((ok, error))
        done.set()

    lane.submit(CopyJob(direction, kv, list(block_ids), list(offsets), slot, handle, finish, after_event, lone))
    assert done.wait(10)
    assert handle._launched and handle._event.recorded == 1
    return outcome[0]


def block_bytes(cache, b: int) -> torch.Tensor:
    return torch.cat([r.pages(cache.regions.num_blocks)[b] for r in cache.regions.regions])


@pytest.mark.parametrize("lone", [False, True])
@pytest.mark.parametrize("launcher", ["inline", "thread"])
@pytest.mark.parametrize("mode", ["staged", "zero_copy", "dma"])
@pytest.mark.parametrize("chunk_blocks", [1, 2, 3, 50])
def test_lane_round_trip_over_scattered_slots(fake_cuda, monkeypatch, mode, chunk_blocks, launcher, lone):
    zero_copy = mode == "zero_copy"
    if launcher == "thread":  # no job is small enough to launch on the caller's thread
        monkeypatch.setattr(transfer, "INLINE_MAX_CHUNKS", 0)
    cache = allocate_attention_kv_cache("LBNHC", num_layers=3, num_blocks=32, num_kv_heads=2, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    slot = cache.regions.block_bytes + 256  # a slot larger than the block: padding must not leak
    pool = torch.zeros(40 * slot, dtype=torch.uint8)
    lane = make_lane(pool, 2 * chunk_blocks * slot, zero_copy, 0 if mode == "dma" else None)
    try:
        src = [5, 0, 31, 7, 8, 9, 2]
        slots = [3, 4, 5, 10, 11, 0, 39]  # runs of 3, 2, 1, 1
        offsets = [s * slot for s in slots]
        expected = [block_bytes(cache, b).clone() for b in src]
        after = FakeEvent()
        assert run(lane, SAVE, cache.regions, src, offsets, slot, after, lone) == (True, None)
        path = lane._paths[SAVE]
        waiter = path.dma if mode == "dma" else path.sm
        assert after in waiter.waited, "the save did not wait for the producer's event"
        for s, data in zip(slots, expected):
            assert torch.equal(pool[s * slot : s * slot + data.numel()], data)
        used = {s for s in slots}
        assert all(int(pool[s * slot : (s + 1) * slot].count_nonzero()) == 0 for s in range(40) if s not in used)

        dst = [10, 11, 12, 13, 14, 15, 16]
        assert run(lane, LOAD, cache.regions, dst, offsets, slot, lone=lone) == (True, None)
        for b, data in zip(dst, expected):
            assert torch.equal(block_bytes(cache, b), data)
    finally:
        lane.close()


def small_lane(dma_min_row: int | None):
    """A 2-layer, 8-block cache, a zeroed pool of 4 slots and a staged lane (DMA from ``dma_min_row``)."""
    cache = allocate_attention_kv_cache("LBNHC", num_layers=2, num_blocks=8, num_kv_heads=1, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    slot = cache.regions.block_bytes
    pool = torch.zeros(4 * slot, dtype=torch.uint8)
    return cache, slot, pool, make_lane(pool, 4 * slot, False, dma_min_row)


def test_a_failing_launch_reports_the_error(fake_cuda):
    cache, slot, pool, lane = small_lane(None)
    try:
        ok, error = run(lane, SAVE, cache.regions, [0], [4 * slot], slot)  # past the pool's end
        assert not ok and "outside the pool" in error
        ok, error = run(lane, LOAD, cache.regions, [0], [3 * slot + 16], slot)  # straddles the end
        assert not ok and "outside the pool" in error
    finally:
        lane.close()


@pytest.mark.parametrize("mode", ["staged", "dma"])
def test_a_producer_event_already_complete_is_not_waited_on_by_the_gpu(fake_cuda, mode):
    cache, slot, pool, lane = small_lane(0 if mode == "dma" else None)
    try:
        done = FakeEvent()
        done.complete = True
        assert run(lane, SAVE, cache.regions, [3, 1], [0, slot], slot, done) == (True, None)
        path = lane._paths[SAVE]
        assert done not in path.sm.waited and done not in path.dma.waited
        assert torch.equal(pool[:slot], block_bytes(cache, 3)) and torch.equal(pool[slot : 2 * slot], block_bytes(cache, 1))
    finally:
        lane.close()


def test_dma_saves_go_by_the_copy_engines_also_while_loads_run(fake_cuda):
    cache, slot, pool, lane = small_lane(0)
    copies_2d = []
    lane._copy_2d[SAVE] = lambda *args: (copies_2d.append(args), FakeCopier2D().copy(*args))
    try:
        assert run(lane, SAVE, cache.regions, [6], [0], slot) == (True, None)
        assert len(copies_2d) == 1  # an idle load path: the copy engines alone
        lane._paths[LOAD].inflight = 1  # a load in flight
        assert run(lane, SAVE, cache.regions, [2], [slot], slot) == (True, None)
        assert len(copies_2d) == 2  # still the copy engines: no SM work beside the loads' scatters
        assert torch.equal(pool[:slot], block_bytes(cache, 6)) and torch.equal(pool[slot : 2 * slot], block_bytes(cache, 2))
        lane._paths[LOAD].inflight = 0
        assert run(lane, SAVE, cache.regions, [5], [2 * slot], slot) == (True, None)
        assert len(copies_2d) == 3
        for k, b in enumerate((6, 2, 5)):
            assert torch.equal(pool[k * slot : (k + 1) * slot], block_bytes(cache, b))
    finally:
        lane._paths[LOAD].inflight = 0
        lane.close()


@pytest.mark.parametrize("lone", [False, True], ids=["busy-path", "lone"])
def test_short_loads_by_dma_longer_ones_staged(fake_cuda, lone):
    """Up to DMA_LOAD_MAX_CHUNKS staging chunks by 2D DMA; a lone load (someone waits on it)
    up to LONE_DMA_LOAD_MAX_CHUNKS; one block more is staged."""
    cache = allocate_attention_kv_cache("LBNHC", num_layers=3, num_blocks=16, num_kv_heads=1, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    slot = cache.regions.block_bytes
    pool = torch.randint(0, 255, (16 * slot,), dtype=torch.uint8)
    lane = make_lane(pool, 2 * slot, False, 0)  # one block per staging chunk
    copies_2d = []
    lane._copy_2d[LOAD] = lambda *args: (copies_2d.append(args), FakeCopier2D().copy(*args))
    try:
        most = transfer.LONE_DMA_LOAD_MAX_CHUNKS if lone else transfer.DMA_LOAD_MAX_CHUNKS
        assert transfer.LONE_DMA_LOAD_MAX_CHUNKS != transfer.DMA_LOAD_MAX_CHUNKS  # else lone tells nothing
        short, long = list(range(most)), list(range(most, 2 * most + 1))
        for ids in (short, long):
            before = cache.buffer.clone()
            offsets = [(15 - b) * slot for b in ids]
            assert run(lane, LOAD, cache.regions, ids, offsets, slot, lone=lone) == (True, None)
            for b, off in zip(ids, offsets):
                assert torch.equal(block_bytes(cache, b), pool[off : off + slot])
            others = [b for b in range(16) if b not in ids]
            assert torch.equal(torch.stack([block_bytes(cache, b) for b in others]),
                               torch.stack([torch.cat([before.view(torch.uint8)[r.offset + b * r.block_stride:][:r.page_bytes]
                                                       for r in cache.regions.regions]) for b in others]))
        assert len(copies_2d) == len(short)  # one 2D copy per block of the short load, none for the long one
    finally:
        lane.close()


@pytest.mark.parametrize("layout", ["BLNHC", "BLHNC"])
def test_whole_block_layouts_copy_runs_by_dma_at_any_length(fake_cuda, monkeypatch, layout):
    """Block-first layouts: saves and loads of any length are 1D copies, one per run of
    consecutive blocks in consecutive slots; no 2D copy, no staging scatter."""
    monkeypatch.setattr(transfer, "WHOLE_BLOCK_DMA_BYTES", 1)  # the test's blocks are small
    cache = allocate_attention_kv_cache(layout, num_layers=3, num_blocks=24, num_kv_heads=2, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    cache.buffer.view(torch.uint8).copy_(torch.randint(0, 256, (cache.buffer.numel() * cache.buffer.element_size(),),
                                                       dtype=torch.uint8))  # fmt: skip
    slot = cache.regions.block_bytes
    pool = torch.randint(0, 256, (30 * slot,), dtype=torch.uint8)
    lane = make_lane(pool, 2 * slot, False, 0)  # one block per staging chunk: any load is "long"
    copies_1d, copies_2d, scatters = [], [], []
    memmove = lane._dma
    lane._dma = lambda dst, src, nbytes, stream: (copies_1d.append(nbytes), memmove(dst, src, nbytes, stream))
    for d in (SAVE, LOAD):
        lane._copy_2d[d] = lambda *args: copies_2d.append(args)
    lane._copier = type("NoScatter", (), {"block_table": lambda *a, **k: scatters.append(a),
                                          "launch_rows": lambda *a, **k: scatters.append(a)})
    try:
        src = [4, 5, 6, 9, 10, 0]  # block runs 4-6, 9-10, 0
        slots = [2, 3, 4, 5, 6, 20]  # slot runs 2-6, 20: copies 4-6 -> 2-4, 9-10 -> 5-6, 0 -> 20
        offsets = [s * slot for s in slots]
        expected = [block_bytes(cache, b).clone() for b in src]
        pool_before = pool.clone()
        assert run(lane, SAVE, cache.regions, src, offsets, slot) == (True, None)
        assert copies_1d == [3 * slot, 2 * slot, slot]
        for s, data in zip(slots, expected):
            assert torch.equal(pool[s * slot : (s + 1) * slot], data)
        untouched = [s for s in range(30) if s not in slots]
        assert all(torch.equal(pool[s * slot : (s + 1) * slot], pool_before[s * slot : (s + 1) * slot]) for s in untouched)

        copies_1d.clear()
        dst = [11, 12, 13, 14, 15, 16]  # consecutive blocks, slot runs 2-6 and 20
        kv_before = {b: block_bytes(cache, b).clone() for b in range(24)}
        assert run(lane, LOAD, cache.regions, dst, offsets, slot) == (True, None)
        assert copies_1d == [5 * slot, slot]
        for b, data in zip(dst, expected):
            assert torch.equal(block_bytes(cache, b), data)
        assert all(torch.equal(block_bytes(cache, b), kv_before[b]) for b in range(24) if b not in dst)
        assert copies_2d == [] and scatters == []
    finally:
        lane.close()


def test_whole_block_loads_need_blocks_of_at_least_the_threshold(fake_cuda):
    cache = allocate_attention_kv_cache("BLNHC", num_layers=3, num_blocks=16, num_kv_heads=1, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    slot = cache.regions.block_bytes  # far below WHOLE_BLOCK_DMA_BYTES
    lane = make_lane(torch.zeros(16 * slot, dtype=torch.uint8), 2 * slot, False, 0)
    try:
        job = CopyJob(LOAD, cache.regions, list(range(8)), [b * slot for b in range(8)], slot, None, None)
        assert lane._dma_load_plan(lane._paths[LOAD], job) is None  # long and small: staged
        job.block_ids, job.offsets = [0], [0]
        assert lane._dma_load_plan(lane._paths[LOAD], job) is not None  # a short load: DMA
    finally:
        lane.close()


def test_a_small_job_on_an_idle_path_completes_on_the_callers_thread(fake_cuda):
    """Completing inline spares the completer thread's hand-off; never for a save whose
    forward still runs, a job past sync_max_bytes, or a path with other copies in flight;
    never with sync_max_bytes 0."""
    cache, slot, pool, lane = small_lane(0)
    lane._sync_max_bytes = 4 * slot  # the default (4 MiB) holds every job here: a tighter bound
    me = threading.get_ident()

    def submit(direction, ids, offsets, after=None):
        finished = threading.Event()
        where: list[int] = []

        def finish(ok, error):
            assert ok, error
            where.append(threading.get_ident())
            finished.set()

        lane.submit(CopyJob(direction, cache.regions, ids, offsets, slot, TransferHandle(FakeEvent()), finish, after))
        done_at_return = finished.is_set()
        assert finished.wait(10)
        return done_at_return, where[0] == me

    try:
        ready = FakeEvent()
        ready.complete = True
        assert submit(SAVE, [3], [0], ready) == (True, True)
        assert submit(SAVE, [4], [slot], FakeEvent())[1] is False  # its forward still runs: the completer
        assert submit(LOAD, [5], [0]) == (True, True)
        assert torch.equal(block_bytes(cache, 5), block_bytes(cache, 3))
        lane._sync_max_bytes = slot
        assert submit(LOAD, [6, 7], [0, slot])[1] is False  # two blocks: past the bound
        lane._sync_max_bytes = 4 * slot
        lane._paths[LOAD].inflight = 1  # another load's copies on the path's streams
        assert submit(LOAD, [1], [slot])[1] is False
        lane._paths[LOAD].inflight = 0
        assert torch.equal(block_bytes(cache, 1), block_bytes(cache, 4))
    finally:
        lane._paths[LOAD].inflight = 0
        lane.close()


def test_with_sync_off_every_job_completes_on_the_completer_thread(fake_cuda):
    cache, slot, pool, lane = small_lane(0)
    assert lane._sync_max_bytes == transfer.SYNC_MAX_BYTES > 0  # on by default
    lane._sync_max_bytes = 0
    me = threading.get_ident()
    where: list[int] = []
    finished = threading.Event()
    try:
        lane.submit(CopyJob(LOAD, cache.regions, [2], [0], slot, TransferHandle(FakeEvent()),
                            lambda ok, error: (where.append(threading.get_ident()), finished.set())))
        assert finished.wait(10) and where[0] != me
    finally:
        lane.close()


def test_a_lone_long_job_blocks_until_its_last_piece_then_spins(fake_cuda, monkeypatch):
    """A job of a transfer that began on an idle path, longer than SPIN_MAX_BYTES: the
    completer blocks on an event recorded where at most SPIN_MAX_BYTES of its copies are left,
    then spins on one beside its end. Not for jobs that are not lone, nor for a save whose
    forward still runs, nor when the lane's late_spin is off."""
    waits: list[str] = []

    class Recorded(FakeEvent):
        def __init__(self, *args, blocking=False, **kwargs) -> None:
            super().__init__()
            self.blocking = blocking
            made.append(self)

        def synchronize(self) -> None:
            waits.append("block" if self.blocking else "spin")

    made: list[Recorded] = []
    monkeypatch.setattr(torch.cuda, "Event", Recorded)  # only _Near makes events from here on
    monkeypatch.setattr(transfer, "SPIN_MAX_BYTES", 0)

    def job(lane, slot, cache, direction, ids, offsets, lone=True, after=None):
        finished = threading.Event()
        handle = TransferHandle(FakeEvent())
        lane.submit(CopyJob(direction, cache.regions, ids, offsets, slot, handle,
                            lambda ok, error: finished.set(), after, lone=lone))
        assert finished.wait(10)
        return [(e.blocking, e.recorded) for e in made]

    cache, slot, pool, lane = small_lane(0)  # saves and short loads by the copy engines
    assert lane._late_spin is True  # the default
    lane._sync_max_bytes = 0  # these jobs are small enough to complete inline otherwise
    made.clear()  # the lane's own staging events
    try:
        monkeypatch.setattr(transfer, "SPIN_MAX_BYTES", slot)  # one block's bytes may be spun through
        assert job(lane, slot, cache, LOAD, [1, 2, 3], [0, slot, 2 * slot]) == [(True, 1), (False, 1)]
        assert waits == ["block", "spin"]
        made.clear(), waits.clear()
        assert job(lane, slot, cache, LOAD, [4, 5], [0, slot], lone=False) == []
        monkeypatch.setattr(transfer, "SPIN_MAX_BYTES", 0)
        assert job(lane, slot, cache, SAVE, [1], [0]) == [(True, 0), (False, 1)]  # no piece left to block on
        assert waits == ["spin"]
        made.clear()
        forward = FakeEvent()  # its forward still runs
        assert job(lane, slot, cache, SAVE, [2], [slot], after=forward) == []
        lane._late_spin = False
        assert job(lane, slot, cache, LOAD, [6], [0]) == []
    finally:
        lane.close()

    cache, slot, pool, lane = small_lane(None)  # staged: two blocks a chunk
    lane._sync_max_bytes = 0
    made.clear(), waits.clear()  # the lane's own staging events
    try:
        src = [0, 1, 2, 3]
        expected = [block_bytes(cache, b).clone() for b in src]
        assert job(lane, slot, cache, SAVE, src, [0, slot, 2 * slot, 3 * slot]) == [(True, 1), (False, 1)]
        made.clear()
        assert job(lane, slot, cache, LOAD, [4, 5, 6, 7], [0, slot, 2 * slot, 3 * slot]) == [(True, 1), (False, 1)]
        assert all(torch.equal(block_bytes(cache, b), e) for b, e in zip((4, 5, 6, 7), expected))
        made.clear()
        assert job(lane, slot, cache, LOAD, [4, 5], [0, slot]) == [(True, 0), (False, 1)]  # one chunk
    finally:
        lane.close()


@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC"])
def test_dma_copies_go_round_robin_over_the_paths_streams_and_join_its_own(fake_cuda, monkeypatch, layout):
    """With dma_streams 3 a job's direct copies (2D rows for layer-first caches, whole-block
    runs for block-first ones) alternate over the path's three streams, which fork from its
    DMA stream and join back into it before the job's event. A one-block job's rows are split
    over the streams (a whole-block run stays one copy on the DMA stream). The bytes land as
    with one stream."""
    copies: list[int] = []
    monkeypatch.setattr(FakeCopier2D, "streams", copies)
    cache = allocate_attention_kv_cache(layout, num_layers=3, num_blocks=32, num_kv_heads=2, head_size=8,
                                        block_size=4, dtype=torch.bfloat16)  # fmt: skip
    cache.regions.regions[0].owner.view(torch.int16).random_()
    slot = cache.regions.block_bytes
    pool = torch.zeros(40 * slot, dtype=torch.uint8)
    lane = make_lane(pool, 64 * slot, False, 0, dma_streams=3)
    whole = layout == "BLNHC"
    if whole:  # whole-block runs: record each 1D copy's stream instead
        lane._dma = lambda dst, src, nbytes, stream: (copies.append(stream), ctypes.memmove(dst, src, nbytes))
    try:
        for direction in (SAVE, LOAD):
            path = lane._paths[direction]
            handles = [path.dma.cuda_stream] + [s.cuda_stream for s in path.more_dma]
            assert len(set(handles)) == 3
            src, slots = [5, 0, 31, 7, 8, 9, 2], [3, 9, 5, 12, 11, 0, 39]  # no two consecutive: seven copies
            if direction == SAVE:
                expected = [block_bytes(cache, b).clone() for b in src]
                ids = src
            else:
                ids = [10, 11, 12, 13, 14, 15, 16]
            copies.clear()
            assert run(lane, direction, cache.regions, ids, [s * slot for s in slots], slot) == (True, None)
            assert copies == [handles[i % 3] for i in range(7)]
            assert all(path.fork in s.waited for s in path.more_dma)
            assert path.dma.waited[-2:] == path.join
            copies.clear()
            one = [39 * slot]  # block 2's slot; loaded into block 20
            assert run(lane, direction, cache.regions, [2] if direction == SAVE else [20], one, slot) == (True, None)
            assert copies == ([handles[0]] if whole else handles)  # 3 rows: one per stream
        for s, b, data in zip(slots, [10, 11, 12, 13, 14, 15, 16], expected):
            assert torch.equal(pool[s * slot : (s + 1) * slot], data)
            assert torch.equal(block_bytes(cache, b), data)
        assert torch.equal(block_bytes(cache, 20), expected[-1])
    finally:
        lane.close()


def test_lane_refuses_no_dma_streams(fake_cuda):
    with pytest.raises(ValueError, match="dma_streams"):
        make_lane(torch.zeros(64, dtype=torch.uint8), 64, False, 0, dma_streams=0)
