"""The engine on CUDA: staged, dma (copy-engine saves) and zero-copy round trips bit-exact, event ordering both ways,
saves and loads at the same time. Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

from pegaflow.engine import Engine, EngineConfig, InstanceSpec
from pegaflow.engine.engine import SLOT_ALIGN
from pegaflow.kernels.layouts import allocate_attention_kv_cache, allocate_kv_first_cache, allocate_mla_kv_cache

pytestmark = pytest.mark.gpu

NUM_BLOCKS = 64
# Cycles of torch.cuda._sleep that keep a producer stream busy far longer than it takes the
# host to enqueue a save (about 0.3-0.5 s at H100/H200 clocks).
PRODUCER_SLEEP_CYCLES = 800_000_000


def hashes(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def make_cache(kind: str):
    if kind == "mla":
        return allocate_mla_kv_cache(num_layers=3, num_blocks=NUM_BLOCKS, block_size=8, device="cuda")
    if kind == "kv_first":
        return allocate_kv_first_cache(num_layers=4, num_blocks=NUM_BLOCKS, num_kv_heads=2, head_size=32, block_size=4,
                                       dtype=torch.bfloat16, device="cuda")
    return allocate_attention_kv_cache(
        kind, num_layers=4, num_blocks=NUM_BLOCKS, num_kv_heads=2, head_size=32, block_size=4,
        dtype=torch.bfloat16, device="cuda",
    )  # fmt: skip


def spec_for(cache, instance_id: str = "vllm-0") -> InstanceSpec:
    return InstanceSpec(instance_id, "m", "bf16", "x", 4, tuple(r.page_bytes for r in cache.regions.regions))


def slot_of(cache) -> int:
    return -(-cache.regions.block_bytes // SLOT_ALIGN) * SLOT_ALIGN


def blocks(cache, ids) -> list[torch.Tensor]:
    """Each block's content (region pages back to back) as a CPU uint8 tensor."""
    pages = [r.pages(cache.regions.num_blocks) for r in cache.regions.regions]
    return [torch.cat([p[b] for p in pages]).cpu() for b in ids]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def engine_for(cache, mode: str, slots: int, chunk_blocks: int = 3) -> Engine:
    slot = slot_of(cache)
    config = EngineConfig(pool_bytes=slots * slot, devices=(0,), staging_bytes=2 * chunk_blocks * slot, save_mode=mode)
    engine = Engine(config)
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    return engine


@pytest.mark.parametrize("streams", [1, 3], ids=["1-dma-stream", "3-dma-streams"])
@pytest.mark.parametrize("launcher", ["inline", "thread"])
@pytest.mark.parametrize("mode", ["staged", "dma", "zero_copy"])
@pytest.mark.parametrize("kind", ["LBNHC", "LBHNC", "BLNHC", "mla", "kv_first"])
def test_round_trip_bit_exact_in_chunks(monkeypatch, mode, kind, launcher, streams):
    from pegaflow.engine import transfer

    monkeypatch.setattr(transfer, "DMA_STREAMS", streams)
    monkeypatch.setattr(transfer, "HEAD_CHUNKS", 1)  # 11 blocks in chunks of 3: pieces of 3, 5 and 3
    monkeypatch.setattr(transfer, "TAIL_CHUNKS", 1)
    monkeypatch.setattr(transfer, "DMA_LOAD_MAX_CHUNKS", 1)
    if launcher == "thread":  # every job through the launcher thread
        monkeypatch.setattr(transfer, "INLINE_MAX_CHUNKS", 0)
    cache = make_cache(kind)
    engine = engine_for(cache, mode, slots=64)
    try:
        src = [40, 3, 17, 5, 6, 7, 8, 63, 0, 22, 11]  # 11 blocks: 4 chunks of <= 3
        hs = hashes(len(src))
        expected = blocks(cache, src)
        handle = engine.save("vllm-0", 0, src, hs)
        assert handle.wait(30).ok and handle.event is not None
        assert engine.query("vllm-0", hs) == len(src)
        before = cache.buffer.clone()
        torch.cuda.synchronize()  # the engine's streams do not wait for ours
        dst = [1, 2, 4, 9, 10, 12, 13, 14, 15, 16, 18]
        result = engine.load("vllm-0", 0, dst, hs).wait(30)
        assert result.ok and result.num_blocks == len(dst)
        assert same(blocks(cache, dst), expected)
        others = [b for b in range(NUM_BLOCKS) if b not in dst]
        assert same(blocks(cache, others), [blk for blk in _blocks_of_buffer(cache, before, others)])
    finally:
        engine.close()


def _blocks_of_buffer(cache, buffer: torch.Tensor, ids) -> list[torch.Tensor]:
    out = []
    for b in ids:
        parts = [buffer[r.offset + b * r.block_stride : r.offset + b * r.block_stride + r.page_bytes] for r in cache.regions.regions]
        out.append(torch.cat(parts).view(torch.uint8).cpu())
    return out


@pytest.mark.parametrize("streams", [1, 3], ids=["1-dma-stream", "3-dma-streams"])
@pytest.mark.parametrize("mode", ["staged", "dma", "zero_copy"])
def test_scattered_slots_after_eviction_round_trip(monkeypatch, mode, streams):
    from pegaflow.engine import transfer

    monkeypatch.setattr(transfer, "DMA_STREAMS", streams)  # one-block saves: rows split over the streams
    cache = make_cache("LBNHC")
    engine = engine_for(cache, mode, slots=8)
    try:
        first = hashes(8)
        for i in range(8):
            engine.save("vllm-0", 0, [i], first[i : i + 1]).wait(30)
        for i in (1, 3, 5, 7):
            engine.query("vllm-0", first[i : i + 1])  # 0, 2, 4, 6 become least recently used
        new = hashes(4)
        src = [20, 21, 22, 23]
        expected = blocks(cache, src)
        result = engine.save("vllm-0", 0, src, new).wait(30)
        assert result.ok and result.num_blocks == 4 and engine.stats()["evictions"] == 4
        assert engine.load("vllm-0", 0, [30, 31, 32, 33], new).wait(30).ok
        assert same(blocks(cache, [30, 31, 32, 33]), expected)
        assert engine.load("vllm-0", 0, [40], first[3:4]).wait(30).ok  # a one-block load (kept: 3 was queried)
        assert same(blocks(cache, [40]), blocks(cache, [3]))
    finally:
        engine.close()


@pytest.mark.parametrize("streams", [1, 3], ids=["1-dma-stream", "3-dma-streams"])
@pytest.mark.parametrize("mode", ["staged", "dma", "zero_copy"])
def test_save_reads_blocks_only_after_the_producer_event(monkeypatch, mode, streams):
    from pegaflow.engine import transfer

    monkeypatch.setattr(transfer, "DMA_STREAMS", streams)  # the extra streams fork after the producer wait
    cache = make_cache("LBNHC")
    engine = engine_for(cache, mode, slots=64)
    try:
        ids = list(range(0, 40, 4))
        hs = hashes(len(ids))
        fresh = torch.empty_like(cache.buffer).random_(-128, 128)
        torch.cuda.synchronize()
        producer = torch.cuda.Stream()
        with torch.cuda.stream(producer):
            torch.cuda._sleep(PRODUCER_SLEEP_CYCLES)
            cache.buffer.copy_(fresh)  # the "forward" writes the blocks after a long time
        written = torch.cuda.Event()
        written.record(producer)
        handle = engine.save("vllm-0", 0, ids, hs, after_event=written)
        if not handle.done():
            assert engine.query("vllm-0", hs) == 0  # not READY before its copy completed
        assert handle.wait(60).ok
        expected = _blocks_of_buffer(cache, fresh, ids)
        cache.buffer.random_(-128, 128)
        torch.cuda.synchronize()  # the engine's streams do not wait for ours
        assert engine.load("vllm-0", 0, ids, hs).wait(30).ok
        assert same(blocks(cache, ids), expected), "the save read blocks before the producer wrote them"
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["staged", "dma", "zero_copy"])
def test_a_consumer_stream_waiting_on_the_load_event_sees_the_blocks(mode):
    cache = make_cache("LBNHC")
    engine = engine_for(cache, mode, slots=64)
    try:
        ids = list(range(10))
        hs = hashes(len(ids))
        expected = blocks(cache, ids)
        engine.save("vllm-0", 0, ids, hs).wait(30)
        torch.cuda.synchronize()
        cache.buffer.random_(-128, 128)
        torch.cuda.synchronize()
        handle = engine.load("vllm-0", 0, ids, hs)
        consumer = torch.cuda.Stream()
        consumer.wait_event(handle.event)
        with torch.cuda.stream(consumer):
            snapshot = cache.buffer.clone()  # ordered after the load by the event alone
        consumer.synchronize()
        assert same(_blocks_of_buffer(cache, snapshot, ids), expected)
        assert handle.wait(30).ok
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["staged", "dma", "zero_copy"])
def test_saves_and_loads_at_the_same_time(mode):
    cache = make_cache("LBNHC")
    engine = engine_for(cache, mode, slots=64)
    try:
        held = hashes(16)
        expected_loaded = blocks(cache, range(16))
        engine.save("vllm-0", 0, list(range(16)), held).wait(30)
        cache.buffer[: cache.buffer.numel() // 2].random_(-128, 128)
        torch.cuda.synchronize()
        saving = list(range(40, 56))
        expected_saved = blocks(cache, saving)
        new = hashes(16)
        load = engine.load("vllm-0", 0, list(range(20, 36)), held)
        save = engine.save("vllm-0", 0, saving, new)
        assert load.wait(30).ok and save.wait(30).ok
        assert same(blocks(cache, range(20, 36)), expected_loaded)
        assert engine.load("vllm-0", 0, list(range(16)), new).wait(30).ok
        assert same(blocks(cache, range(16)), expected_saved)
    finally:
        engine.close()


def test_kv_on_a_device_the_engine_does_not_serve_is_rejected():
    cache = make_cache("LBNHC")
    engine = Engine(EngineConfig(pool_bytes=1 << 20, devices=(0,)))
    try:
        engine.register_instance(spec_for(cache))
        with pytest.raises(ValueError, match="device=1"):
            engine.register_kv("vllm-0", 0, cache.regions, device=1)
        cpu = allocate_attention_kv_cache("LBNHC", num_layers=4, num_blocks=8, num_kv_heads=2, head_size=32,
                                          block_size=4, dtype=torch.bfloat16)  # fmt: skip
        with pytest.raises(ValueError, match="cpu"):
            engine.register_kv("vllm-0", 0, cpu.regions)
    finally:
        engine.close()


def test_tables_uploaded_behind_a_held_stream_are_each_read_right(monkeypatch):
    """The uploader reuses one device table and a few pinned host buffers: with the stream held
    (a long sleep) every table still reaches its own launches, through the ring while a host
    buffer is free, the old way once none is, and across a growth of the device buffer."""
    import random

    from pegaflow.engine import tables
    from pegaflow.kernels import triton_copy

    monkeypatch.setattr(tables, "INITIAL_ENTRIES", 16)  # below one table: the buffers grow
    rng = random.Random(os.urandom(8))
    cache = make_cache("LBNHC")
    kv, pitch = cache.regions, slot_of(cache)
    stream = torch.cuda.Stream()
    uploader = tables.TableUploader(torch.device("cuda", 0), stream, buffers=3)
    wanted, rows = [], []
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(PRODUCER_SLEEP_CYCLES // 4)  # uploads and launches queue behind it
        for i in range(12):
            ids = rng.sample(range(NUM_BLOCKS), 1 + 3 * i)
            table = triton_copy.block_table(kv, ids, pitch, to_kv=False, upload=uploader.upload)
            buf = torch.empty(len(ids) * pitch, dtype=torch.uint8, device="cuda")
            triton_copy.launch_rows(table, 0, len(ids), buf)
            wanted.append(ids)
            rows.append(buf)
    stream.synchronize()
    assert uploader.fallbacks > 0, "the stream was not held long enough to use up the host buffers"
    for ids, buf in zip(wanted, rows):
        got = [buf[j * pitch : j * pitch + kv.block_bytes].cpu() for j in range(len(ids))]
        assert same(got, blocks(cache, ids))


@pytest.mark.parametrize("inline", [False, True], ids=["launcher-thread", "inline"])
def test_busy_caller_stream_does_not_reorder_the_id_upload(monkeypatch, inline):
    """The ids a job's launches read are uploaded on the engine's own stream: a caller whose
    current stream is busy (vLLM's compute stream, here a long sleep) cannot delay the upload
    past the launches (which then read stale ids and copy the wrong blocks)."""
    from pegaflow.engine import transfer

    if not inline:
        monkeypatch.setattr(transfer, "INLINE_MAX_CHUNKS", 0)
    torch.manual_seed(11)
    cache = make_cache("LBNHC")
    engine = engine_for(cache, "staged", slots=32, chunk_blocks=2)
    try:
        src, dst = [7, 3, 50, 21, 9, 60], [1, 2, 40, 41, 42, 63]
        expected = blocks(cache, src)
        keys = hashes(len(src))
        torch.cuda.synchronize()
        torch.cuda._sleep(PRODUCER_SLEEP_CYCLES)  # the caller's current stream: busy for ~0.4 s
        assert engine.save("vllm-0", 0, src, keys).wait(30).ok
        torch.cuda._sleep(PRODUCER_SLEEP_CYCLES)
        assert engine.load("vllm-0", 0, dst, keys).wait(30).ok
        torch.cuda.synchronize()
        assert same(blocks(cache, dst), expected)
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["BLNHC", "BLHNC"])
def test_block_first_layouts_go_whole_by_dma_in_merged_runs(monkeypatch, kind):
    """Blocks that are one contiguous run: a long load by the copy engines too (no staging),
    consecutive blocks in consecutive slots as one copy each way; bit-exact, nothing else
    touched."""
    from pegaflow.engine import transfer

    monkeypatch.setattr(transfer, "WHOLE_BLOCK_DMA_BYTES", 1)  # the test's blocks are 4 KiB
    cache = make_cache(kind)
    assert slot_of(cache) == cache.regions.block_bytes
    engine = engine_for(cache, "dma", slots=64)
    lane = engine._lanes[0]
    sizes: list[int] = []
    copy = lane._dma
    lane._dma = lambda dst, src, nbytes, stream: (sizes.append(nbytes), copy(dst, src, nbytes, stream))
    try:
        src = list(range(10, 26)) + [3, 40, 41]  # runs of 16, 1 and 2 blocks
        hs = hashes(len(src))
        expected = blocks(cache, src)
        assert engine.save("vllm-0", 0, src, hs).wait(30).ok
        saved = len(sizes)
        assert saved < len(src)  # merged: the fresh pool hands out consecutive slots
        torch.cuda.synchronize()
        before = cache.buffer.clone()
        dst = list(range(44, 63))  # one run of blocks
        result = engine.load("vllm-0", 0, dst, hs).wait(30)
        assert result.ok and result.num_blocks == len(dst)
        assert len(sizes) - saved < len(dst)
        assert sum(sizes[saved:]) == len(dst) * cache.regions.block_bytes
        assert same(blocks(cache, dst), expected)
        others = [b for b in range(NUM_BLOCKS) if b not in dst]
        assert same(blocks(cache, others), _blocks_of_buffer(cache, before, others))
    finally:
        engine.close()
