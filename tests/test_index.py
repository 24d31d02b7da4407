"""Block index scenarios: prefix queries, TP completeness, pins, LRU, full pool, write timeouts."""

from __future__ import annotations

import hashlib

import pytest

from pegaflow.engine.index import READY, WRITING, BlockIndex

S = 1024  # slot bytes
NS = "model@0000"


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def save(index: BlockIndex, ids, rank: int = 0, ranks: int = 1, ok: bool = True, ns: str = NS, slot: int = S):
    plan = index.prepare_save(ns, [h(i) for i in ids], rank, ranks, slot)
    index.complete_save(plan, ok)
    return plan


def test_query_is_the_longest_ready_prefix():
    index = BlockIndex(16 * S, 30.0)
    save(index, [0, 1, 2, 4])
    assert index.query(NS, [h(i) for i in range(6)]) == 3
    assert index.query(NS, [h(9), h(0)]) == 0
    assert index.query("other@ns", [h(0)]) == 0
    assert index.counters["hits"] == 3 and index.counters["misses"] == 3 + 2 + 1


def test_entry_is_ready_only_after_its_copy_completes():
    index = BlockIndex(16 * S, 30.0)
    plan = index.prepare_save(NS, [h(0)], 0, 1, S)
    assert index.state_of(NS, h(0)) == WRITING
    assert index.query(NS, [h(0)]) == 0
    assert index.prepare_load(NS, [h(0)], 0).missing == (0,)
    index.complete_save(plan, True)
    assert index.state_of(NS, h(0)) == READY
    assert index.query(NS, [h(0)]) == 1


def test_tp_block_is_a_hit_only_when_every_rank_saved_it():
    index = BlockIndex(16 * S, 30.0)
    save(index, [0, 1], rank=0, ranks=4)
    save(index, [0, 1], rank=2, ranks=4)
    save(index, [0], rank=3, ranks=4)
    assert index.query(NS, [h(0), h(1)]) == 0
    save(index, [0, 1], rank=1, ranks=4)
    assert index.query(NS, [h(0), h(1)]) == 1  # block 1 still lacks rank 3
    save(index, [1], rank=3, ranks=4)
    assert index.query(NS, [h(0), h(1)]) == 2
    assert index.allocator.used_bytes == 2 * 4 * S


def test_ranks_slots_are_distinct_and_rank_major_contiguous():
    index = BlockIndex(16 * S, 30.0)
    plans = [index.prepare_save(NS, [h(i) for i in range(3)], r, 2, S) for r in range(2)]
    offsets = [p.offsets() for p in plans]
    assert offsets[0] == [0, S, 2 * S] and offsets[1] == [3 * S, 4 * S, 5 * S]


def test_replicated_block_needs_one_save_from_any_rank():
    index = BlockIndex(16 * S, 30.0)
    save(index, [0], rank=0, ranks=1)  # the engine maps every rank to stored rank 0
    assert index.query(NS, [h(0)]) == 1
    again = index.prepare_save(NS, [h(0)], 0, 1, S)
    assert again.writes == () and again.skipped == (0,)


def test_saving_a_held_block_is_skipped_and_refreshes_lru():
    index = BlockIndex(16 * S, 30.0)
    save(index, [0, 1, 2])
    plan = save(index, [0, 3])
    assert plan.skipped == (0,) and [i for i, _ in plan.writes] == [1]
    assert index.lru_keys() == [(NS, h(1)), (NS, h(2)), (NS, h(0)), (NS, h(3))]


def test_duplicate_hashes_in_one_save_are_written_once():
    index = BlockIndex(16 * S, 30.0)
    plan = save(index, [5, 5, 6])
    assert plan.skipped == (1,) and index.allocator.used_bytes == 2 * S


def test_eviction_takes_the_least_recently_used_first():
    index = BlockIndex(4 * S, 30.0)
    save(index, [0, 1, 2, 3])
    index.query(NS, [h(0)])  # 0 becomes most recent: LRU order 1, 2, 3, 0
    save(index, [10, 11])
    assert index.query(NS, [h(1)]) == 0 and index.query(NS, [h(2)]) == 0
    assert index.query(NS, [h(3), h(0), h(10), h(11)]) == 4
    assert index.counters["evictions"] == 2


def test_a_pinned_entry_is_never_evicted():
    index = BlockIndex(2 * S, 30.0)
    save(index, [0, 1])
    load = index.prepare_load(NS, [h(0)], 0)
    plan = save(index, [7, 8])
    assert plan.skipped == (1,)  # only block 1 could be evicted: room for one
    assert index.query(NS, [h(0)]) == 1 and index.query(NS, [h(7)]) == 1
    index.unpin(load)  # a finished load makes 0 the most recently used: LRU order 7, 0
    plan = save(index, [9])
    assert plan.skipped == ()
    assert index.state_of(NS, h(7)) is None and index.state_of(NS, h(0)) == READY
    plan = save(index, [10])
    assert index.state_of(NS, h(0)) is None  # unpinned, it is evictable like any other


def test_full_pool_of_pinned_entries_skips_every_block():
    index = BlockIndex(2 * S, 30.0)
    save(index, [0, 1])
    index.prepare_load(NS, [h(0), h(1)], 0)
    plan = save(index, [2, 3, 4])
    assert plan.writes == () and plan.skipped == (0, 1, 2)
    assert index.counters["no_room"] == 3 and index.counters["evictions"] == 0


def test_full_pool_saves_the_prefix_that_fits():
    index = BlockIndex(3 * S, 30.0)
    plan = save(index, [0, 1, 2, 3, 4])
    assert [i for i, _ in plan.writes] == [0, 1, 2] and plan.skipped == (3, 4)
    assert index.query(NS, [h(i) for i in range(5)]) == 3


def test_eviction_is_atomic_when_it_cannot_free_enough():
    # Four slots of S; the ends pinned. A block of 3 S would need the two middle entries plus
    # a pinned one: it must fail and leave the two middle entries untouched.
    index = BlockIndex(4 * S, 30.0)
    save(index, [0, 1, 2, 3])
    index.prepare_load(NS, [h(0), h(3)], 0)
    before = index.lru_keys()
    plan = index.prepare_save("big@ns", [h(100)], 0, 1, 3 * S)
    assert plan.writes == () and plan.skipped == (0,)
    assert index.lru_keys() == before
    assert index.query(NS, [h(1), h(2)]) == 2
    assert index.counters["evictions"] == 0
    assert index.allocator.free_bytes == 0


def test_variable_slot_sizes_share_one_pool():
    index = BlockIndex(10 * S, 30.0)
    save(index, [0, 1], ns="a@1", slot=S)
    save(index, [0, 1], ns="b@2", slot=3 * S)
    assert index.allocator.used_bytes == 8 * S
    assert index.query("a@1", [h(0), h(1)]) == 2 and index.query("b@2", [h(0), h(1)]) == 2


def test_unfinished_entries_are_reclaimed_after_the_write_timeout():
    clock = Clock()
    index = BlockIndex(4 * S, 5.0, clock=clock)
    save(index, [0, 1], rank=0, ranks=2)  # rank 1 never comes
    assert index.allocator.used_bytes == 4 * S
    clock.now += 4.9
    assert index.query(NS, [h(0)]) == 0 and len(index) == 2
    clock.now += 0.2
    assert index.query(NS, [h(0)]) == 0
    assert len(index) == 0 and index.allocator.used_bytes == 0
    assert index.counters["write_timeouts"] == 2


def test_an_entry_reclaimed_mid_copy_frees_its_slots_when_the_copy_completes():
    clock = Clock()
    index = BlockIndex(2 * S, 5.0, clock=clock)
    plan = index.prepare_save(NS, [h(0)], 0, 1, S)
    clock.now += 10
    index.query(NS, [])  # reclaims: the copy is still in flight, so the slot stays taken
    assert len(index) == 0 and index.allocator.used_bytes == S
    index.complete_save(plan, True)
    assert index.allocator.used_bytes == 0 and index.query(NS, [h(0)]) == 0


def test_a_failed_copy_drops_the_entry():
    index = BlockIndex(4 * S, 30.0)
    save(index, [0], ok=False)
    assert index.state_of(NS, h(0)) is None and index.allocator.used_bytes == 0


def test_forget_stops_advertising_a_failed_load_and_frees_after_unpin():
    index = BlockIndex(4 * S, 30.0)
    save(index, [0, 1])
    load = index.prepare_load(NS, [h(0)], 0)
    index.forget(load)
    assert index.query(NS, [h(0)]) == 0
    assert index.allocator.used_bytes == 2 * S  # still pinned by the load
    index.unpin(load)
    assert index.allocator.used_bytes == S


@pytest.mark.parametrize("ranks", [1, 2])
def test_stats_account_for_every_slot(ranks):
    index = BlockIndex(64 * S, 30.0)
    for r in range(ranks):
        save(index, range(10), rank=r, ranks=ranks)
    stats = index.stats()
    assert stats["entries"] == stats["entries_ready"] == 10
    assert stats["pool_used"] == 10 * ranks * S and stats["pool_free"] == (64 - 10 * ranks) * S


def test_drop_namespace_frees_ready_slots_now_and_in_flight_ones_when_their_copy_completes():
    index = BlockIndex(8 * S, 30.0)
    save(index, [0, 1])
    save(index, [0], ns="other@ns")
    writing = index.prepare_save(NS, [h(2)], 0, 1, S)  # copy still in flight
    assert index.drop_namespace(NS) == 3
    assert index.query(NS, [h(0)]) == 0 and index.query("other@ns", [h(0)]) == 1
    assert index.allocator.used_bytes == 2 * S  # other@ns's block and the slot being written
    index.complete_save(writing, True)
    assert index.allocator.used_bytes == S and index.query(NS, [h(2)]) == 0
