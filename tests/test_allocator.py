"""Slot allocator: exact accounting, no overlap, no leak, contiguous runs preferred."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow.engine.allocator import Run, SlotAllocator


def test_one_contiguous_run_when_it_fits():
    a = SlotAllocator(1000)
    assert a.allocate(3, 100) == [Run(0, 3)]
    assert a.free_bytes == 700 and a.used_bytes == 300


def test_prefers_the_smallest_extent_that_fits():
    a = SlotAllocator(1000)
    a.allocate(10, 100)
    a.free(0, 200)  # hole [0, 200)
    a.free(500, 400)  # hole [500, 900)
    assert a.allocate(2, 100) == [Run(0, 2)]  # the small hole, keeping the large one whole


def test_splits_over_pieces_when_no_extent_is_large_enough():
    a = SlotAllocator(1000)
    a.allocate(10, 100)
    for start in (0, 300, 600):
        a.free(start, 200)
    runs = a.allocate(5, 100)
    assert runs is not None and sum(r.count for r in runs) == 5
    assert a.free_bytes == 100


def test_fails_without_change_when_slots_do_not_fit():
    a = SlotAllocator(1000)
    a.allocate(10, 100)
    a.free(0, 150)
    a.free(400, 150)  # 300 bytes free, but only 2 whole slots of 100... and of 150: 2
    before = a.free_extents()
    assert a.allocate(3, 120) is None
    assert a.free_extents() == before
    assert a.allocate(2, 150) is not None


def test_free_coalesces_neighbours():
    a = SlotAllocator(400)
    a.allocate(4, 100)
    a.free(100, 100)
    a.free(300, 100)
    a.free(200, 100)
    assert a.free_extents() == [(100, 300)]
    a.free(0, 100)
    assert a.free_extents() == [(0, 400)]


def test_double_free_and_out_of_range_are_rejected():
    a = SlotAllocator(400)
    a.allocate(2, 100)
    a.free(0, 100)
    with pytest.raises(ValueError, match="double free"):
        a.free(0, 100)
    with pytest.raises(ValueError, match="double free"):
        a.free(150, 100)  # reaches into the free tail [200, 400)
    with pytest.raises(ValueError, match="outside"):
        a.free(350, 100)


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        SlotAllocator(-1)
    a = SlotAllocator(100)
    with pytest.raises(ValueError, match="slot_bytes"):
        a.allocate(1, 0)
    with pytest.raises(ValueError, match="count"):
        a.allocate(-1, 10)
    assert a.allocate(0, 10) == []


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 12), st.sampled_from([1, 7, 64, 100, 256])),
        st.tuples(st.just("free"), st.integers(0, 10_000), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 4096), ops=ops)
def test_random_alloc_free_never_overlaps_or_leaks(capacity, ops):
    a = SlotAllocator(capacity)
    held: list[tuple[int, int]] = []  # (offset, nbytes) of single slots
    for op, n, slot in ops:
        if op == "alloc":
            expect_ok = a.can_allocate(n, slot)
            whole_slots = sum(length // slot for _, length in a.free_extents())
            assert expect_ok == (whole_slots >= n)
            before = a.free_extents()
            runs = a.allocate(n, slot)
            if runs is None:
                assert not expect_ok and a.free_extents() == before
                continue
            assert expect_ok and sum(r.count for r in runs) == n
            if any(length >= n * slot for _, length in before):
                assert len(runs) == 1, "a fitting extent existed: one run expected"
            for r in runs:
                held.extend((r.offset + i * slot, slot) for i in range(r.count))
        elif held:
            offset, nbytes = held.pop(n % len(held))
            a.free(offset, nbytes)
        # invariants after every step: held slots and free extents tile [0, capacity) exactly
        pieces = sorted(held + a.free_extents())
        cursor = 0
        for start, length in pieces:
            assert start == cursor, f"gap or overlap at {cursor}: next piece starts at {start}"
            cursor += length
        assert cursor == capacity
        assert a.free_bytes == sum(length for _, length in a.free_extents())
        assert a.used_bytes == sum(nbytes for _, nbytes in held)
        extents = a.free_extents()
        for (s1, l1), (s2, _) in zip(extents, extents[1:]):
            assert s1 + l1 < s2, "adjacent free extents were not coalesced"
