"""Transfers booked and launched in pieces (on the GPU lane: growing pieces from the first
staging chunks and the last ones apart on an idle path, the last ones apart on a busy one): the caller sees one transfer, with skipped and missing indices, counts and contents as if it were one piece.
Run on the CPU with the CPU lane told that a chunk is 2 blocks (pieces [0, 2), [2, 6), ..., [n - 2, n))."""

from __future__ import annotations

import pytest
import torch

from pegaflow.engine import Engine, EngineConfig, TransferResult
from pegaflow.engine.handle import merge_results
from pegaflow.engine.transfer import CpuLane
from test_engine import NUM_BLOCKS, block_bytes_of, hashes, llama_like, reset, spec_for


@pytest.fixture
def chunks_of_2(monkeypatch):
    monkeypatch.setattr(CpuLane, "head_blocks", lambda self, direction, slot_bytes: 2)
    eng = Engine(EngineConfig(pool_bytes=4 << 20))
    cache = llama_like()
    eng.register_instance(spec_for(cache))
    eng.register_kv("vllm-0", 0, cache.regions)
    yield eng, cache
    eng.close()


def test_save_in_pieces_reports_skips_as_one_transfer(chunks_of_2):
    engine, cache = chunks_of_2
    torch.manual_seed(5)
    reset(cache)
    keys = hashes(10)
    assert engine.save("vllm-0", 0, [1, 2], keys[3:5]).wait(10).ok  # 2 of the 10 already held
    src = list(range(10, 20))
    keys[8] = keys[1]  # a repeat inside the call, in another piece than its first
    result = engine.save("vllm-0", 0, src, keys).wait(10)
    assert result.ok and result.skipped == (3, 4, 8)
    assert result.num_blocks == 7 and result.nbytes == 7 * cache.regions.block_bytes
    stats = engine.stats()
    assert stats["saves"] == 2 and stats["blocks_saved"] == 9 and stats["skipped_saves"] == 3


def test_load_in_pieces_round_trips_and_reports_missing_across_pieces(chunks_of_2):
    engine, cache = chunks_of_2
    torch.manual_seed(6)
    reset(cache)
    src = [0, 5, 9, 3, 7, 11, 2]
    keys = hashes(len(src))
    expected = [block_bytes_of(cache, b) for b in src]
    assert engine.save("vllm-0", 0, src, keys).wait(10).ok
    dst = [12, 13, 14, 15, 16, 17, 18]
    untouched = {b: block_bytes_of(cache, b) for b in range(NUM_BLOCKS) if b not in dst}
    result = engine.load("vllm-0", 0, dst, keys).wait(10)
    assert result == TransferResult(True, 7, 7 * cache.regions.block_bytes)
    assert [block_bytes_of(cache, b) for b in dst] == expected
    assert all(block_bytes_of(cache, b) == data for b, data in untouched.items())

    absent = keys[:]
    absent[1], absent[5] = hashes(2)  # in the first and the last piece
    reset(cache)
    result = engine.load("vllm-0", 0, dst, absent).wait(10)
    assert not result.ok and result.missing == (1, 5) and result.num_blocks == 5
    assert result.error == "2 of 7 blocks not held"
    assert [block_bytes_of(cache, dst[i]) for i in (0, 2, 3, 4, 6)] == [expected[i] for i in (0, 2, 3, 4, 6)]
    assert engine.stats()["loads"] == 2 and engine.stats()["loads_pinned"] == 0


def test_merge_results_shifts_indices_and_keeps_the_first_copy_error():
    parts = [(0, TransferResult(True, 3, 30)), (3, TransferResult(True, 1, 10, skipped=(0, 2))),
             (6, TransferResult(False, 0, 0, error="copy failed")), (9, TransferResult(False, 0, 0, missing=(1,),
                                                                                        error="1 of 3 blocks not held"))]
    merged = merge_results(parts, 12)
    assert merged == TransferResult(False, 4, 40, skipped=(3, 5), missing=(10,), error="copy failed")
    assert merge_results([(0, TransferResult(True, 2, 20))], 2) == TransferResult(True, 2, 20)


def test_pieces_grow_from_the_head_and_keep_the_tail_apart():
    from pegaflow.engine.engine import _pieces

    # Idle path: head, doubling pieces, tail; no middle shorter than the tail.
    assert _pieces(0, 4, 4) == [(0, 0)]
    assert _pieces(8, 4, 4) == [(0, 8)]
    assert _pieces(9, 4, 4) == [(0, 4), (4, 5)]
    assert _pieces(13, 4, 4) == [(0, 4), (4, 5), (9, 4)]
    assert _pieces(512, 64, 64) == [(0, 64), (64, 128), (192, 256), (448, 64)]
    assert _pieces(625, 64, 64) == [(0, 64), (64, 128), (192, 256), (448, 113), (561, 64)]
    assert _pieces(13, 4, None) == [(0, 4), (4, 5), (9, 4)]
    # Busy path: the tail alone.
    assert _pieces(13, None, 4) == [(0, 9), (9, 4)]
    assert _pieces(7, None, 4) == [(0, 7)]
    assert _pieces(13, None, None) == [(0, 13)]
    for head in (None, 1, 3):
        for tail in (None, 1, 3):
            for count in range(60):
                parts = _pieces(count, head, tail)
                assert [i for first, n in parts for i in range(first, first + n)] == list(range(count))
                assert all(n > 0 for _, n in parts) or count == 0


def test_a_failed_copy_is_reported_even_where_blocks_were_missing_too():
    parts = [(0, TransferResult(False, 0, 0, missing=(2,), error="RuntimeError: cuMemcpyAsync failed")),
             (4, TransferResult(False, 3, 30, missing=(0,), error="1 of 4 blocks not held"))]
    merged = merge_results(parts, 8)
    assert merged.missing == (2, 4) and merged.error == "RuntimeError: cuMemcpyAsync failed"
    only_missing = [(0, TransferResult(False, 3, 30, missing=(2,), error="1 of 4 blocks not held")), parts[1]]
    assert merge_results(only_missing, 8).error == "2 of 8 blocks not held"


def test_every_piece_of_a_transfer_that_began_on_an_idle_path_is_marked_lone(monkeypatch):
    """The lane waits for lone long jobs' ends in two steps (transfer.LATE_SPIN); a busy path's
    transfers (head_blocks None) are not lone."""
    idle = [True]
    monkeypatch.setattr(CpuLane, "head_blocks", lambda self, direction, slot_bytes: 2 if idle[0] else None)
    monkeypatch.setattr(CpuLane, "tail_blocks", lambda self, direction, slot_bytes: 2)
    seen: list[tuple[str, int, bool]] = []
    submit = CpuLane.submit
    monkeypatch.setattr(CpuLane, "submit", lambda self, job: (seen.append((job.direction, len(job.block_ids), job.lone)),
                                                              submit(self, job)))
    with Engine(EngineConfig(pool_bytes=4 << 20)) as engine:
        cache = llama_like()
        engine.register_instance(spec_for(cache))
        engine.register_kv("vllm-0", 0, cache.regions)
        keys = hashes(7)
        assert engine.save("vllm-0", 0, list(range(7)), keys).wait(10).ok
        assert seen == [("save", 2, True), ("save", 3, True), ("save", 2, True)]
        seen.clear()
        idle[0] = False
        assert engine.load("vllm-0", 0, list(range(8, 15)), keys).wait(10).ok
        assert seen == [("load", 5, False), ("load", 2, False)]
