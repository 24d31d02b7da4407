"""The engine on the CPU: save -> load round trips bit-exact, validation, pins, callbacks."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from pegaflow.engine import Engine, EngineConfig, InstanceSpec, TransferResult
from pegaflow.engine import transfer
from pegaflow.engine.handle import TransferHandle
from pegaflow.engine.transfer import LOAD, SAVE, CopyJob, CpuLane
from pegaflow.kernels.layouts import allocate_attention_kv_cache, allocate_kv_first_cache, allocate_mla_kv_cache

NUM_BLOCKS = 24


def hashes(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def llama_like(layout: str = "LBNHC", dtype: torch.dtype = torch.bfloat16, layers: int = 4):
    return allocate_attention_kv_cache(
        layout, num_layers=layers, num_blocks=NUM_BLOCKS, num_kv_heads=2, head_size=16, block_size=4, dtype=dtype
    )


def spec_for(kv, instance_id: str = "vllm-0", model: str = "llama", tp: int = 1, replicated: bool = False, layout: str = "LBNHC"):
    return InstanceSpec(
        instance_id=instance_id, model=model, kv_dtype="bf16", layout=layout, block_size=4,
        page_bytes=tuple(r.page_bytes for r in kv.regions.regions), tp_size=tp, replicated=replicated,
    )  # fmt: skip


def block_bytes_of(cache, block: int) -> bytes:
    """A block's content in region order, read through the vLLM views' storage."""
    return b"".join(bytes(r.pages(cache.regions.num_blocks)[block].numpy().tobytes()) for r in cache.regions.regions)


@pytest.fixture
def engine():
    eng = Engine(EngineConfig(pool_bytes=4 << 20))
    yield eng
    eng.close()


def reset(cache) -> torch.Tensor:
    """Fresh random bytes over the whole cache; returns a copy of them."""
    cache.buffer.random_(-128, 128)
    return cache.buffer.clone()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: llama_like("LBNHC", torch.bfloat16), id="LBNHC-bf16"),
        pytest.param(lambda: llama_like("LBHNC", torch.float8_e4m3fn), id="LBHNC-fp8"),
        pytest.param(lambda: llama_like("BLNHC", torch.bfloat16), id="BLNHC-bf16"),
        pytest.param(
            lambda: allocate_kv_first_cache(num_layers=3, num_blocks=NUM_BLOCKS, block_size=4, num_kv_heads=2,
                                            head_size=8, dtype=torch.float16),  # fmt: skip
            id="kv-first-fp16",
        ),
        pytest.param(lambda: allocate_mla_kv_cache(num_layers=3, num_blocks=NUM_BLOCKS, block_size=8), id="mla-bf16"),
        pytest.param(
            lambda: allocate_mla_kv_cache(num_layers=2, num_blocks=NUM_BLOCKS, block_size=4, fp8_ds_mla=True),
            id="fp8_ds_mla",
        ),
    ],
)
@pytest.mark.parametrize("inline_pages", [0, 1 << 20], ids=["thread-reference", "inline-by-address"])
def test_save_then_load_round_trips_bit_exact(engine, make, inline_pages, monkeypatch):
    monkeypatch.setattr(transfer, "CPU_INLINE_PAGES", inline_pages)  # the CPU lane's two copy paths
    cache = make()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    saved_blocks = [17, 3, 4, 5, 0, 23, 9]
    hs = hashes(len(saved_blocks))
    original = reset(cache)
    expected = {b: block_bytes_of(cache, b) for b in saved_blocks}
    result = engine.save("vllm-0", 0, saved_blocks, hs).wait(10)
    assert result == TransferResult(True, 7, 7 * cache.regions.block_bytes)
    assert engine.query("vllm-0", hs) == 7

    after_save = reset(cache)  # overwrite everything, then load into other blocks
    targets = [1, 2, 6, 7, 8, 10, 11]
    result = engine.load("vllm-0", 0, targets, hs).wait(10)
    assert result.ok and result.num_blocks == 7 and result.missing == ()
    for src, dst in zip(saved_blocks, targets):
        assert block_bytes_of(cache, dst) == expected[src], f"block {dst} (saved from {src}) differs"
    # Nothing but the loaded blocks changed.
    untouched = cache.buffer.clone()
    for dst in targets:
        for r in cache.regions.regions:
            start = r.offset + dst * r.block_stride
            untouched[start : start + r.page_bytes] = after_save[start : start + r.page_bytes]
    assert torch.equal(untouched, after_save)
    assert not torch.equal(original, after_save)


def test_two_instances_of_one_model_share_blocks_two_models_never(engine):
    a, b, c = llama_like(), llama_like(), llama_like()
    ns_a = engine.register_instance(spec_for(a, "a"))
    ns_b = engine.register_instance(spec_for(b, "b"))
    ns_c = engine.register_instance(spec_for(c, "c", model="other"))
    assert ns_a == ns_b != ns_c
    for name, cache in (("a", a), ("b", b), ("c", c)):
        engine.register_kv(name, 0, cache.regions)
    hs = hashes(3)
    engine.save("a", 0, [0, 1, 2], hs).wait(10)
    assert engine.query("b", hs) == 3 and engine.query("c", hs) == 0
    assert engine.load("b", 0, [5, 6, 7], hs).wait(10).ok
    assert [block_bytes_of(b, i) for i in (5, 6, 7)] == [block_bytes_of(a, i) for i in (0, 1, 2)]
    assert engine.load("c", 0, [5], hs[:1]).wait(10).missing == (0,)


def test_tp_instance_is_a_hit_once_every_rank_saved():
    with Engine(EngineConfig(pool_bytes=4 << 20)) as engine:
        ranks = [llama_like() for _ in range(2)]
        engine.register_instance(spec_for(ranks[0], tp=2))
        for r, cache in enumerate(ranks):
            engine.register_kv("vllm-0", r, cache.regions)
        hs = hashes(4)
        engine.save("vllm-0", 0, [0, 1, 2, 3], hs).wait(10)
        assert engine.query("vllm-0", hs) == 0
        assert engine.load("vllm-0", 1, [4], hs[:1]).wait(10).missing == (0,)
        engine.save("vllm-0", 1, [4, 5, 6, 7], hs).wait(10)
        assert engine.query("vllm-0", hs) == 4
        expected = [[block_bytes_of(c, b) for b in blocks] for c, blocks in zip(ranks, ([0, 1, 2, 3], [4, 5, 6, 7]))]
        for r, cache in enumerate(ranks):
            cache.buffer.random_(-128, 128)
            assert engine.load("vllm-0", r, [10, 11, 12, 13], hs).wait(10).ok
            assert [block_bytes_of(cache, b) for b in (10, 11, 12, 13)] == expected[r]


def test_replicated_mla_is_stored_once_and_served_to_every_rank():
    with Engine(EngineConfig(pool_bytes=4 << 20)) as engine:
        ranks = [allocate_mla_kv_cache(num_layers=2, num_blocks=NUM_BLOCKS, block_size=4) for _ in range(4)]
        engine.register_instance(spec_for(ranks[0], tp=4, replicated=True))
        for r, cache in enumerate(ranks):
            engine.register_kv("vllm-0", r, cache.regions)
        hs = hashes(2)
        assert engine.save("vllm-0", 2, [0, 1], hs).wait(10).num_blocks == 2
        assert engine.save("vllm-0", 0, [0, 1], hs).wait(10).skipped == (0, 1)
        assert engine.query("vllm-0", hs) == 2
        assert engine.stats()["pool_used"] == 2 * 256 * -(-ranks[0].regions.block_bytes // 256)
        for r in (0, 3):
            assert engine.load("vllm-0", r, [5, 6], hs).wait(10).ok
            assert [block_bytes_of(ranks[r], b) for b in (5, 6)] == [block_bytes_of(ranks[2], b) for b in (0, 1)]


def test_held_blocks_are_skipped_and_counted(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    hs = hashes(4)
    engine.save("vllm-0", 0, [0, 1], hs[:2]).wait(10)
    result = engine.save("vllm-0", 0, [0, 1, 2, 3], hs).wait(10)
    assert result.ok and result.skipped == (0, 1) and result.num_blocks == 2
    stats = engine.stats()
    assert stats["skipped_saves"] == 2 and stats["blocks_saved"] == 4
    assert stats["bytes_saved"] == 4 * cache.regions.block_bytes


def test_a_full_pool_skips_without_error():
    cache = llama_like()
    slot = -(-cache.regions.block_bytes // 256) * 256
    with Engine(EngineConfig(pool_bytes=3 * slot)) as engine:
        engine.register_instance(spec_for(cache))
        engine.register_kv("vllm-0", 0, cache.regions)
        hs = hashes(5)
        result = engine.save("vllm-0", 0, [0, 1, 2, 3, 4], hs).wait(10)
        assert result.ok and result.num_blocks == 3 and result.skipped == (3, 4)
        assert engine.query("vllm-0", hs) == 3


def test_load_of_missing_blocks_fails_for_them_and_loads_the_rest(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    hs = hashes(3)
    engine.save("vllm-0", 0, [0, 2], [hs[0], hs[2]]).wait(10)
    expected = [block_bytes_of(cache, 0), block_bytes_of(cache, 2)]
    result = engine.load("vllm-0", 0, [10, 11, 12], hs).wait(10)
    assert not result.ok and result.missing == (1,) and result.num_blocks == 2 and "not held" in result.error
    assert [block_bytes_of(cache, 10), block_bytes_of(cache, 12)] == expected
    assert engine.stats()["load_missing"] == 1


def test_cpu_lane_copies_small_jobs_on_the_callers_thread_and_queues_behind_a_busy_worker(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    reset(cache)
    hs = hashes(2)
    assert engine.save("vllm-0", 0, [0], hs[:1]).done()  # copied before save() returned
    gate = _gate(engine, SAVE)
    try:
        handle = engine.save("vllm-0", 0, [1], hs[1:])
        assert not handle.done()  # behind the gate: in order on the worker
    finally:
        gate.set()
    assert handle.wait(10).ok
    expected = [block_bytes_of(cache, b) for b in (0, 1)]
    reset(cache)
    assert engine.load("vllm-0", 0, [5, 6], hs).wait(10).ok
    assert [block_bytes_of(cache, b) for b in (5, 6)] == expected


@pytest.mark.parametrize("ids, offsets", [([0], [-256]), ([0], [1 << 20]), ([NUM_BLOCKS], [0]), ([-1], [0]),
                                          ([0, 1], [0])])
@pytest.mark.parametrize("direction", [SAVE, LOAD])
def test_cpu_lane_inline_copy_checks_ids_and_slots_before_touching_memory(ids, offsets, direction):
    cache = llama_like()
    before = reset(cache)
    pool = torch.randint(-128, 128, (1 << 20,), dtype=torch.int8).view(torch.uint8)
    pool_before = pool.clone()
    slot = -(-cache.regions.block_bytes // 256) * 256
    outcome: list[tuple[bool, str | None]] = []
    lane = CpuLane(pool)
    try:
        lane.submit(CopyJob(direction, cache.regions, ids, offsets, slot, TransferHandle(),
                            lambda ok, error: outcome.append((ok, error))))
    finally:
        lane.close()
    assert len(outcome) == 1 and not outcome[0][0] and "ValueError" in outcome[0][1]
    assert torch.equal(cache.buffer, before) and torch.equal(pool, pool_before)


def _gate(engine: Engine, direction: str) -> threading.Event:
    """Block the CPU lane's worker of ``direction`` until the returned event is set."""
    gate = threading.Event()
    engine._lanes[None]._workers[direction].put(gate.wait)
    return gate


def test_unregister_releases_the_pins_of_loads_in_flight():
    cache = llama_like()
    slot = -(-cache.regions.block_bytes // 256) * 256
    with Engine(EngineConfig(pool_bytes=2 * slot)) as engine:
        engine.register_instance(spec_for(cache, "a"))
        engine.register_instance(spec_for(cache, "b"))
        engine.register_kv("a", 0, cache.regions)
        engine.register_kv("b", 0, cache.regions)
        hs = hashes(4)
        engine.save("a", 0, [0, 1], hs[:2]).wait(10)
        gate = _gate(engine, LOAD)
        try:
            handle = engine.load("a", 0, [5, 6], hs[:2])
            assert engine.stats()["entries_pinned"] == 2
            # pinned: a save that needs room skips
            assert engine.save("b", 0, [2, 3], hs[2:]).wait(10).skipped == (0, 1)
            engine.unregister("a")
            assert engine.stats()["entries_pinned"] == 0
            assert engine.save("b", 0, [2, 3], hs[2:]).wait(10).skipped == ()
            assert not handle.done()
        finally:
            gate.set()
        handle.wait(10)
        assert engine.stats()["entries_pinned"] == 0 and engine.query("b", hs[2:]) == 2


def test_wait_times_out_and_callbacks_run_once(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    gate = _gate(engine, "save")
    try:
        handle = engine.save("vllm-0", 0, [0], hashes(1))
        with pytest.raises(TimeoutError):
            handle.wait(0.01)
        assert not handle.done()
        seen: list[tuple[str, TransferResult]] = []
        done = threading.Event()
        handle.add_done_callback(lambda r: (seen.append((threading.current_thread().name, r)), done.set()))
    finally:
        gate.set()
    assert done.wait(10) and handle.wait(10).ok
    assert len(seen) == 1 and seen[0][0] != threading.current_thread().name
    late: list[TransferResult] = []
    handle.add_done_callback(late.append)
    assert late == [seen[0][1]]


def test_handle_is_cpu_mode_event_none(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    assert engine.save("vllm-0", 0, [0], hashes(1)).event is None


def test_bad_input_is_rejected_before_anything_changes(engine):
    cache = llama_like()
    engine.register_instance(spec_for(cache))
    engine.register_kv("vllm-0", 0, cache.regions)
    hs = hashes(2)
    bad_calls = {
        "unknown instance": lambda: engine.save("nope", 0, [0], hs[:1]),
        "rank": lambda: engine.save("vllm-0", 1, [0], hs[:1]),
        "lengths differ": lambda: engine.save("vllm-0", 0, [0, 1], hs[:1]),
        "out of range": lambda: engine.save("vllm-0", 0, [NUM_BLOCKS], hs[:1]),
        "-1, out of range": lambda: engine.load("vllm-0", 0, [-1], hs[:1]),
        "not an int": lambda: engine.save("vllm-0", 0, [1.0], hs[:1]),
        "32 bytes": lambda: engine.save("vllm-0", 0, [0], [b"short"]),
        r"hashes\[1\] must be": lambda: engine.query("vllm-0", [hs[0], "text"]),
        "duplicates": lambda: engine.load("vllm-0", 0, [3, 3], hs),
        "sequence of bytes": lambda: engine.query("vllm-0", b"x" * 32),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()
    stats = engine.stats()
    assert stats["saves"] == stats["loads"] == stats["pool_used"] == stats["entries"] == 0


def test_registration_errors(engine):
    cache = llama_like()
    spec = spec_for(cache)
    assert engine.register_instance(spec) == engine.register_instance(spec) == spec.namespace
    with pytest.raises(ValueError, match="another spec"):
        engine.register_instance(spec_for(cache, model="other"))
    with pytest.raises(ValueError, match="block_bytes"):
        engine.register_kv("vllm-0", 0, llama_like(layers=3).regions)
    with pytest.raises(ValueError, match="rank 1 out of range"):
        engine.register_kv("vllm-0", 1, cache.regions)
    with pytest.raises(ValueError, match="CPU mode"):
        engine.register_kv("vllm-0", 0, cache.regions, device=0)
    with pytest.raises(ValueError, match="no registered KV cache"):
        engine.save("vllm-0", 0, [0], hashes(1))
    engine.register_kv("vllm-0", 0, cache.regions)
    engine.unregister_kv("vllm-0", 0)
    with pytest.raises(ValueError, match="no registered KV cache"):
        engine.load("vllm-0", 0, [0], hashes(1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Engine(EngineConfig(pool_bytes=1 << 20, devices=(0,)))
    else:
        with pytest.raises(ValueError, match="does not exist"):
            Engine(EngineConfig(pool_bytes=1 << 20, devices=(torch.cuda.device_count(),)))


def test_stored_blocks_outlive_the_instance_that_saved_them(engine):
    a, b = llama_like(), llama_like()
    engine.register_instance(spec_for(a, "a"))
    engine.register_kv("a", 0, a.regions)
    hs = hashes(2)
    engine.save("a", 0, [0, 1], hs).wait(10)
    engine.unregister("a")
    with pytest.raises(ValueError, match="unknown instance"):
        engine.query("a", hs)
    engine.register_instance(spec_for(b, "b"))
    assert engine.query("b", hs) == 2


def test_close_is_idempotent_and_final():
    engine = Engine(EngineConfig(pool_bytes=1 << 20))
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.register_instance(spec_for(llama_like()))


def test_reset_drops_the_namespace_and_a_load_in_flight_still_completes():
    a, other = llama_like(), llama_like()
    with Engine(EngineConfig(pool_bytes=64 * a.regions.block_bytes)) as engine:
        engine.register_instance(spec_for(a, "a"))
        engine.register_instance(spec_for(other, "o", model="other"))
        engine.register_kv("a", 0, a.regions)
        engine.register_kv("o", 0, other.regions)
        hs = hashes(4)
        assert engine.save("a", 0, [0, 1, 2, 3], hs).wait(10).ok
        assert engine.save("o", 0, [0, 1], hs[:2]).wait(10).ok
        expected = [block_bytes_of(a, i) for i in (0, 1)]
        used = engine.stats()["pool_used"]
        gate = _gate(engine, LOAD)
        try:
            handle = engine.load("a", 0, [5, 6], hs[:2])
            assert engine.reset("a") == 4
            assert engine.query("a", hs) == 0 and engine.query("o", hs[:2]) == 2
            assert engine.load("a", 0, [7], hs[2:3]).wait(10).missing == (0,)
        finally:
            gate.set()
        assert handle.wait(10).ok
        assert [block_bytes_of(a, i) for i in (5, 6)] == expected
        stats = engine.stats()
        assert stats["entries_pinned"] == 0 and stats["pool_used"] == used // 3  # o's 2 of 6 slots
