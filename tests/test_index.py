"""Block index scenarios: prefix queries, TP completeness, pins, LRU, full pool, write timeouts;
the wire form of hashes; and the whole index against an eager model (hypothesis)."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import pegaflow.engine.index as index_module
from pegaflow.engine.index import READY, SPLIT_CHUNK, WRITING, BlockIndex, split_hashes

S = 1024  # slot bytes
NS = "model@0000"


@pytest.fixture(autouse=True, params=["compiled", "dicts"])
def index_kind(request, monkeypatch):
    """Every scenario twice: queries through the compiled hash sets, and through the dicts alone."""
    if request.param == "dicts":
        monkeypatch.setattr(index_module.hash_set, "warm_up", lambda: False)
    elif not index_module.hash_set.warm_up():
        pytest.skip("numba is not installed: the index has no compiled hash sets")
    return request.param


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


def test_save_records_are_let_go_once_their_entries_are_ready_or_reclaimed():
    clock = Clock()
    index = BlockIndex(64 * S, 5.0, clock=clock)
    save(index, [0, 1], rank=0, ranks=2)  # rank 1 never comes: held until the timeout
    for i in range(3):
        save(index, [10 + 2 * i, 11 + 2 * i], rank=0, ranks=2)
        save(index, [10 + 2 * i, 11 + 2 * i], rank=1, ranks=2)
    assert index.query(NS, [h(10), h(11)]) == 2
    assert index.stats()["entries_writing"] == 2 and index.stats()["entries_ready"] == 6
    # The stuck record at the front keeps the finished ones behind it, whose entries it dropped.
    assert len(index._batches) == 4 and [b.entries is None for b in index._batches] == [False, True, True, True]
    clock.now += 5.1
    assert index.query(NS, [h(0)]) == 0
    assert not index._batches and index.stats()["entries_writing"] == 0
    assert index.counters["write_timeouts"] == 2 and len(index) == 6


def test_a_dropped_writing_entry_leaves_the_writing_count():
    index = BlockIndex(16 * S, 30.0)
    plan = index.prepare_save(NS, [h(0), h(1)], 0, 2, S)
    assert index.stats()["entries_writing"] == 2
    assert index.drop_namespace(NS) == 2
    assert index.stats()["entries_writing"] == 0 and not index._batches
    index.complete_save(plan, True)  # the copy ends after the drop: its slots are freed now
    assert index.allocator.used_bytes == 0 and len(index) == 0


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


# -- the wire form: hashes back to back ---------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 17, 1000, SPLIT_CHUNK, SPLIT_CHUNK + 1, 3 * SPLIT_CHUNK + 5])
def test_split_hashes_is_exact(count):
    hashes = [os.urandom(20) for _ in range(count)]
    assert split_hashes(b"".join(hashes), 20) == tuple(hashes)


@pytest.mark.parametrize("size", [0, -32, 32])
def test_split_hashes_refuses_a_partial_hash(size):
    with pytest.raises(ValueError, match="33 bytes"):
        split_hashes(b"x" * 33, size)


@pytest.mark.parametrize("count", [1, 5, SPLIT_CHUNK + 3])
def test_query_blob_is_the_longest_ready_prefix(count):
    index = BlockIndex((2 * SPLIT_CHUNK + 8) * S, 30.0)
    save(index, range(count))
    hashes = [h(i) for i in range(count)]
    for held in (count, count - 1, 1, 0):  # every hash a hit; a miss last, second, first
        query = hashes[:held] + [h(-1)] + hashes[held + 1:]
        assert index.query_blob(NS, b"".join(query), 32) == min(held, count)
        assert index.query(NS, query) == min(held, count)
    assert index.query_blob(NS, b"", 32) == 0 and index.query_blob("other@ns", b"".join(hashes), 32) == 0
    with pytest.raises(ValueError, match="whole number"):
        index.query_blob(NS, b"".join(hashes)[:-1], 32)


def test_a_query_hit_on_a_pinned_entry_does_not_move_it_after_its_unpin():
    # 0 is pinned when queried: the logged touch is a no-op, so its unpin alone places it.
    index = BlockIndex(8 * S, 30.0)
    save(index, [0, 1, 2])
    load = index.prepare_load(NS, [h(0)], 0)
    assert index.query(NS, [h(0), h(1)]) == 2  # LRU (without 0): 2, 1
    index.unpin(load)  # 0 is the most recent: 2, 1, 0
    save(index, [3])  # 3 after it
    assert index.lru_keys() == [(NS, h(2)), (NS, h(1)), (NS, h(0)), (NS, h(3))]


def test_a_query_between_a_saves_prepare_and_complete_refreshes_before_the_new_entries():
    index = BlockIndex(8 * S, 30.0)
    save(index, [0, 1])
    plan = index.prepare_save(NS, [h(2)], 0, 1, S)
    assert index.query(NS, [h(0)]) == 1  # LRU: 1, 0
    index.complete_save(plan, True)  # 2 becomes READY after that hit: 1, 0, 2
    assert index.lru_keys() == [(NS, h(1)), (NS, h(0)), (NS, h(2))]


def test_the_touch_log_is_bounded(monkeypatch):
    monkeypatch.setattr(index_module, "TOUCH_LOG_LIMIT", 4)
    index = BlockIndex(8 * S, 30.0)
    save(index, [0, 1, 2])
    for i in (0, 2, 0):  # none repeats the one before it: three logged queries
        index.query(NS, [h(i)])
    assert len(index._touches) == 3 and index.pending_touches() == 3
    index.query(NS, [h(1), h(0)])
    assert not index._touches and index.pending_touches() == 0  # applied at once: 2, 1, 0
    assert index.lru_keys() == [(NS, h(2)), (NS, h(1)), (NS, h(0))]


def test_a_query_that_touches_the_previous_ones_hits_again_replaces_it_in_the_log():
    index = BlockIndex(8 * S, 30.0)
    save(index, [0, 1, 2, 3])
    index.query(NS, [h(1), h(2)])
    index.query(NS, [h(1), h(2)])  # the same again: one logged query
    assert len(index._touches) == 1 and index.pending_touches() == 2
    index.query(NS, [h(1), h(2), h(0)])  # a longer prefix of it: replaces it
    assert len(index._touches) == 1 and index.pending_touches() == 3
    index.query(NS, [h(1)])  # shorter: 2 and 0 keep their earlier touches
    assert len(index._touches) == 2 and index.pending_touches() == 4
    index.query(NS, [h(2), h(1)])  # the same entries in another order: kept apart
    assert len(index._touches) == 3
    assert index.lru_keys() == [(NS, h(3)), (NS, h(0)), (NS, h(2)), (NS, h(1))]
    index.apply_touches()
    assert index.lru_keys() == [(NS, h(3)), (NS, h(0)), (NS, h(2)), (NS, h(1))]


def test_touches_applied_in_slices_give_the_order_of_one_apply():
    index = BlockIndex(16 * S, 30.0)
    save(index, range(8))
    index.query(NS, [h(i) for i in (5, 6, 7, 0)])
    index.query(NS, [h(i) for i in (2, 5)])
    index.query(NS, [h(i) for i in (5, 6, 7, 0, 1)])  # not the previous one's hits: logged apart
    expected = index.lru_keys()
    assert expected == [(NS, h(i)) for i in (3, 4, 2, 5, 6, 7, 0, 1)]
    slices = 0
    while index.apply_touches(3):  # 11 touches, 3 at a time, across the queries' boundaries
        slices += 1
        assert index.lru_keys() == expected  # a half-applied log reads the same
    assert slices == 3 and index.pending_touches() == 0
    assert index.lru_keys() == expected
    # A repeat of a half-applied query replaces what is left of it.
    index.query(NS, [h(i) for i in (3, 4, 2)])
    index.apply_touches(1)
    index.query(NS, [h(i) for i in (3, 4, 2, 5)])
    assert len(index._touches) == 1 and index.pending_touches() == 4
    index.apply_touches()
    assert index.lru_keys() == [(NS, h(i)) for i in (6, 7, 0, 1, 3, 4, 2, 5)]


def test_logged_touches_of_entries_dropped_or_pinned_since_are_skipped():
    index = BlockIndex(16 * S, 30.0)
    save(index, range(4))
    save(index, range(4), ns="other@ns")
    index.query(NS, [h(0), h(1)])
    index.query("other@ns", [h(3), h(0)])
    index.drop_namespace(NS)  # no pins: the apply meets a missing entry and filters
    index.apply_touches()
    assert index.lru_keys() == [("other@ns", h(1)), ("other@ns", h(2)), ("other@ns", h(3)), ("other@ns", h(0))]
    index.query("other@ns", [h(1), h(2)])
    load = index.prepare_load("other@ns", [h(2)], 0)
    index.query("other@ns", [h(3)])
    index.apply_touches()  # 2 is pinned: its touch is a no-op
    assert index.lru_keys() == [("other@ns", h(0)), ("other@ns", h(1)), ("other@ns", h(3))]
    index.unpin(load)
    assert index.lru_keys() == [("other@ns", h(0)), ("other@ns", h(1)), ("other@ns", h(3)), ("other@ns", h(2))]


@pytest.mark.parametrize("held", [0, 1, 2, 500, 999, 1000])
def test_a_query_stops_at_the_first_miss_even_if_later_hashes_are_held(held):
    index = BlockIndex(1100 * S, 30.0)
    save(index, range(1000))
    hashes = [h(i) for i in range(1000)]
    hashes[held:held + 1] = [h(-1)] if held < 1000 else []
    hashes.append(h(-1))
    hashes.append(h(3))  # held, after misses: not a hit
    assert index.query_blob(NS, b"".join(hashes), 32) == held
    assert index.query(NS, hashes) == held
    assert index.pending_touches() == held  # the second query replaced the first in the log


# -- the index against an eager model (LRU refreshed at once, one slot size) --------------


class _ModelEntry:
    def __init__(self, key: tuple[str, bytes], ranks: int, created: float, rank: int) -> None:
        self.key, self.ranks, self.created = key, ranks, created
        self.written: set[int] = set()
        self.in_flight = {rank}
        self.pins, self.dead, self.held = 0, False, True

    @property
    def ready(self) -> bool:
        return len(self.written) == self.ranks


class _Model:
    """The index's rules, written plainly: the LRU order is a list refreshed on every hit."""

    def __init__(self, capacity: int, timeout: float) -> None:
        self.free, self.timeout = capacity, timeout
        self.entries: dict[tuple[str, bytes], _ModelEntry] = {}
        self.lru: list[tuple[str, bytes]] = []
        self.writing: list[_ModelEntry] = []
        self.counters = dict.fromkeys(("hits", "misses", "evictions", "write_timeouts", "no_room", "dropped"), 0)

    def _release(self, e: _ModelEntry) -> None:
        if e.dead and e.held and not e.pins and not e.in_flight:
            self.free += e.ranks
            e.held = False

    def _drop(self, e: _ModelEntry) -> None:
        e.dead = True
        del self.entries[e.key]
        if e in self.writing:
            self.writing.remove(e)
        if e.key in self.lru:
            self.lru.remove(e.key)

    def _reclaim(self, now: float) -> None:
        for e in list(self.writing):
            if e.created <= now - self.timeout:
                self.counters["write_timeouts"] += 1
                self._drop(e)
                self._release(e)

    def _touch(self, e: _ModelEntry) -> None:
        if not e.pins:
            self.lru.remove(e.key)
            self.lru.append(e.key)

    def query(self, ns: str, hashes: list[bytes], now: float) -> int:
        if self.writing:
            self._reclaim(now)
        n = 0
        for hh in hashes:
            e = self.entries.get((ns, hh))
            if e is None or not e.ready:
                break
            self._touch(e)
            n += 1
        self.counters["hits"] += n
        self.counters["misses"] += len(hashes) - n
        return n

    def _reserve(self, count: int) -> bool:
        evicted: list[_ModelEntry] = []
        while self.free < count:
            shortfall = max(count - self.free, 1)
            batch = []
            while self.lru and shortfall > 0:
                e = self.entries.pop(self.lru.pop(0))
                batch.append(e)
                shortfall -= e.ranks
            if not batch:
                self.free -= sum(e.ranks for e in evicted)
                for e in reversed(evicted):
                    self.entries[e.key] = e
                    self.lru.insert(0, e.key)
                return False
            self.free += sum(e.ranks for e in batch)
            evicted += batch
        self.free -= count
        for e in evicted:
            e.dead, e.held = True, False
        self.counters["evictions"] += len(evicted)
        return True

    def prepare_save(self, ns: str, hashes: list[bytes], rank: int, ranks: int, now: float):
        self._reclaim(now)
        writes, skipped, fresh, seen = [], [], [], set()
        for i, hh in enumerate(hashes):
            if hh in seen:
                skipped.append(i)
                continue
            seen.add(hh)
            e = self.entries.get((ns, hh))
            if e is None:
                fresh.append((i, hh))
            elif e.ready:
                self._touch(e)
                skipped.append(i)
            elif rank in e.written or rank in e.in_flight:
                skipped.append(i)
            else:
                e.in_flight.add(rank)
                writes.append((i, e))
        if fresh:
            placed = fresh if self._reserve(len(fresh) * ranks) else []
            if not placed:
                for pair in fresh:
                    if not self._reserve(ranks):
                        break
                    placed.append(pair)
            for i, hh in placed:
                e = _ModelEntry((ns, hh), ranks, now, rank)
                self.entries[e.key] = e
                self.writing.append(e)
                writes.append((i, e))
            skipped += [i for i, _ in fresh[len(placed):]]
            self.counters["no_room"] += len(fresh) - len(placed)
        return sorted(writes, key=lambda w: w[0]), sorted(skipped), rank

    def complete_save(self, plan, ok: bool) -> None:
        writes, _, rank = plan
        for _, e in writes:
            e.in_flight.discard(rank)
            if e.dead:
                self._release(e)
            elif not ok:
                self._drop(e)
                self._release(e)
            else:
                e.written.add(rank)
                if e.ready:
                    self.writing.remove(e)
                    self.lru.append(e.key)

    def prepare_load(self, ns: str, hashes: list[bytes]):
        reads, missing = [], []
        for i, hh in enumerate(hashes):
            e = self.entries.get((ns, hh))
            if e is None or not e.ready:
                missing.append(i)
                continue
            if not e.pins:
                self.lru.remove(e.key)
            e.pins += 1
            reads.append((i, e))
        return reads, missing

    def unpin(self, reads) -> None:
        for _, e in reads:
            e.pins -= 1
            if not e.pins:
                if e.dead:
                    self._release(e)
                else:
                    self.lru.append(e.key)

    def forget(self, reads) -> None:
        for _, e in reads:
            if not e.dead:
                self._drop(e)
            self._release(e)

    def drop_namespace(self, ns: str) -> int:
        entries = [e for key, e in self.entries.items() if key[0] == ns]
        for e in entries:
            self._drop(e)
            self._release(e)
        self.counters["dropped"] += len(entries)
        return len(entries)


_UNIVERSE = 5
_CAPACITY = 8  # slots: room for a few entries, so saves evict
_NAMESPACES = {"a@1": 1, "b@2": 2}  # namespace -> stored ranks (slots per entry)
_hash_lists = st.lists(st.integers(0, _UNIVERSE - 1), min_size=1, max_size=6)


class IndexAgainstEagerModel(RuleBasedStateMachine):
    """Random interleavings of query/save/complete/load/unpin/forget/drop/time: the index's
    results, states, pool use, counters and LRU order are the model's after every step, so
    the deferred LRU touches are never visible."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.index = BlockIndex(_CAPACITY * S, 5.0, clock=self.clock)
        self.model = _Model(_CAPACITY, 5.0)
        self.saves: list[tuple] = []
        self.loads: list[tuple] = []
        self.last_query: tuple[str, list[bytes]] | None = None
        self.old_limit = index_module.TOUCH_LOG_LIMIT

    @initialize(limit=st.sampled_from([1, 3, 1 << 16]))
    def touch_log_limit(self, limit):
        index_module.TOUCH_LOG_LIMIT = limit

    def teardown(self) -> None:
        index_module.TOUCH_LOG_LIMIT = self.old_limit

    @rule(ns=st.sampled_from(sorted(_NAMESPACES)), data=st.data(), blob=st.booleans())
    def query(self, ns, data, blob):
        # Mostly held hashes first (hits are what move LRU places), then any.
        held = [i for i in range(_UNIVERSE) if (e := self.model.entries.get((ns, h(i)))) is not None and e.ready]
        ids = data.draw(st.lists(st.sampled_from(held), max_size=4)) if held else []
        ids += data.draw(st.lists(st.integers(0, _UNIVERSE - 1), max_size=2))
        self._query(ns, [h(i) for i in ids], blob)

    @precondition(lambda self: self.last_query)
    @rule(data=st.data(), blob=st.booleans())
    def query_again(self, data, blob):
        """The last query again, cut short, or longer (a log entry replaced or kept)."""
        ns, hashes = self.last_query
        cut = data.draw(st.integers(0, len(hashes)))
        more = data.draw(st.lists(st.integers(0, _UNIVERSE - 1), max_size=3))
        self._query(ns, hashes[:cut] + [h(i) for i in more], blob)

    def _query(self, ns, hashes, blob):
        got = self.index.query_blob(ns, b"".join(hashes), 32) if blob else self.index.query(ns, hashes)
        assert got == self.model.query(ns, hashes, self.clock.now)
        self.last_query = (ns, hashes)

    @rule(ns=st.sampled_from(sorted(_NAMESPACES)), ids=_hash_lists, data=st.data())
    def save(self, ns, ids, data):
        ranks = _NAMESPACES[ns]
        rank = data.draw(st.integers(0, ranks - 1))
        hashes = [h(i) for i in ids]
        plan = self.index.prepare_save(ns, hashes, rank, ranks, S)
        expected = self.model.prepare_save(ns, hashes, rank, ranks, self.clock.now)
        assert plan.positions() == [i for i, _ in expected[0]]
        assert list(plan.skipped) == expected[1]
        assert len(plan.offsets()) == len(plan.writes) == len(set(plan.offsets()))
        self.saves.append((plan, expected))

    @precondition(lambda self: self.saves)
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def complete_save(self, data, ok):
        plan, expected = self.saves.pop(data.draw(st.integers(0, len(self.saves) - 1)))
        self.index.complete_save(plan, ok)
        self.model.complete_save(expected, ok)

    @rule(ns=st.sampled_from(sorted(_NAMESPACES)), ids=_hash_lists)
    def save_on_every_rank(self, ns, ids):
        """Saves that complete at once (what makes most entries READY)."""
        hashes = [h(i) for i in ids]
        for rank in range(_NAMESPACES[ns]):
            plan = self.index.prepare_save(ns, hashes, rank, _NAMESPACES[ns], S)
            expected = self.model.prepare_save(ns, hashes, rank, _NAMESPACES[ns], self.clock.now)
            assert plan.positions() == [i for i, _ in expected[0]] and list(plan.skipped) == expected[1]
            self.index.complete_save(plan, True)
            self.model.complete_save(expected, True)

    @rule(ns=st.sampled_from(sorted(_NAMESPACES)), ids=_hash_lists)
    def load(self, ns, ids):
        hashes = [h(i) for i in ids]
        plan = self.index.prepare_load(ns, hashes, 0)
        reads, missing = self.model.prepare_load(ns, hashes)
        assert plan.positions() == [i for i, _ in reads] and list(plan.missing) == missing
        self.loads.append((plan, reads))

    @precondition(lambda self: self.loads)
    @rule(data=st.data(), failed=st.booleans())
    def finish_load(self, data, failed):
        plan, reads = self.loads.pop(data.draw(st.integers(0, len(self.loads) - 1)))
        if failed:  # the engine forgets a failed load's entries, then unpins them
            self.index.forget(plan)
            self.model.forget(reads)
        self.index.unpin(plan)
        self.model.unpin(reads)

    @rule(ns=st.sampled_from(sorted(_NAMESPACES)))
    def drop_namespace(self, ns):
        assert self.index.drop_namespace(ns) == self.model.drop_namespace(ns)

    @rule(limit=st.sampled_from([1, 2, 5]))
    def apply_some_touches(self, limit):
        """What the server does while no request waits: part of the log, order unchanged."""
        pending = self.index.pending_touches()
        assert self.index.apply_touches(limit) == (pending > limit)
        assert self.index.pending_touches() == max(0, pending - limit)

    @rule(seconds=st.sampled_from([1.0, 3.0, 6.0]))
    def time_passes(self, seconds):
        self.clock.now += seconds

    @invariant()
    def same_contents(self):
        index, model = self.index, self.model
        assert index.lru_keys() == model.lru  # with the touches still logged: lru_keys applies none
        assert index.allocator.used_bytes == (_CAPACITY - model.free) * S
        assert len(index) == len(model.entries)
        assert index.counters == model.counters
        for ns in _NAMESPACES:
            for i in range(_UNIVERSE):
                e = model.entries.get((ns, h(i)))
                assert index.state_of(ns, h(i)) == (None if e is None else READY if e.ready else WRITING)


def test_index_against_eager_model():
    run_state_machine_as_test(IndexAgainstEagerModel,
                              settings=settings(max_examples=300, stateful_step_count=40, deadline=None))


@pytest.mark.parametrize("ranks", [1, 2])
def test_merged_runs_of_many_entries_match_a_plain_merge(ranks):
    from hypothesis import given

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 400), min_size=66, max_size=120, unique=True))
    def check(slots):
        # Large victim sets take numpy's path: the runs must be those of a sort-and-merge loop.
        entries = [index_module.Entry(NS, h(i), S, tuple((slots[i] + 500 * r) * S for r in range(ranks)), None, 0)
                   for i in range(len(slots))]
        spans = sorted(o for e in entries for o in e.slots)
        expected: list[list[int]] = []
        for o in spans:
            if expected and expected[-1][0] + expected[-1][1] == o:
                expected[-1][1] += S
            else:
                expected.append([o, S])
        assert index_module._merged_runs(entries) == [tuple(r) for r in expected]

    check()


def test_eviction_of_many_equal_entries_takes_exactly_the_oldest_needed():
    index = BlockIndex(100 * S, 30.0)
    save(index, range(60), ns="a@1")
    save(index, range(20), ns="b@2", slot=2 * S)  # the pool is full
    save(index, range(100, 150), ns="a@1")  # evicts a@1's 0..49, oldest first, in one step
    assert index.counters["evictions"] == 50
    assert index.lru_keys() == ([("a@1", h(i)) for i in range(50, 60)] + [("b@2", h(i)) for i in range(20)]
                                + [("a@1", h(i)) for i in range(100, 150)])
    assert index.allocator.used_bytes == 100 * S and len(index) == 10 + 20 + 50
    # 60 S more: a@1's 50..59 (10 S), b@2's 0..19 (40 S), then a@1's 100..109 (10 S), and no more.
    save(index, range(200, 230), ns="b@2", slot=2 * S)
    assert index.counters["evictions"] == 50 + 10 + 20 + 10
    assert index.lru_keys() == [("a@1", h(i)) for i in range(110, 150)] + [("b@2", h(i)) for i in range(200, 230)]
    assert index.allocator.used_bytes == 100 * S and index.stats()["pool_free"] == 0


def test_eviction_through_mixed_sizes_reads_each_victim_once(monkeypatch):
    """Two models' entries alternate in the LRU order (S and 2S slots): a save of 4S slots
    evicts the oldest 40 pairs, exactly, and reads the order about once, not a shortfall's
    worth of entries per victim (~280 ms for one 512-block save of DeepSeek-sized slots)."""
    index = BlockIndex(300 * S, 30.0)
    for i in range(100):
        save(index, [i], ns="a@1")
        save(index, [i], ns="b@2", slot=2 * S)  # the pool is full
    read = [0]
    real_islice = index_module.islice

    def counting_islice(iterable, *args):
        for item in real_islice(iterable, *args):
            read[0] += 1
            yield item

    monkeypatch.setattr(index_module, "islice", counting_islice)
    plan = save(index, range(1000, 1030), ns="c@3", slot=4 * S)
    assert len(plan.writes) == 30 and index.counters["evictions"] == 80
    assert index.lru_keys()[:2] == [("a@1", h(40)), ("b@2", h(40))]
    assert index.query("a@1", [h(39)]) == 0 and index.query("b@2", [h(40)]) == 1
    assert read[0] <= 3 * 80, read[0]
