"""How a transfer's slots are cut into chunks and runs of consecutive slots."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pegaflow.engine.transfer import Piece, chunks, pieces

S = 256


def test_pieces_follow_consecutive_slots_and_the_cap():
    offsets = [0, S, 2 * S, 10 * S, 11 * S, 5 * S]
    assert pieces(offsets, S, 100) == [Piece(0, 0, 3), Piece(3, 10 * S, 2), Piece(5, 5 * S, 1)]
    assert pieces(offsets, S, 2) == [Piece(0, 0, 2), Piece(2, 2 * S, 1), Piece(3, 10 * S, 2), Piece(5, 5 * S, 1)]
    assert pieces([], S, 4) == []


def test_chunks_hold_at_most_max_count_blocks():
    offsets = [i * S for i in range(7)]
    assert chunks(offsets, S, 3) == [[Piece(0, 0, 3)], [Piece(3, 3 * S, 3)], [Piece(6, 6 * S, 1)]]


@given(
    slots=st.lists(st.integers(0, 40), min_size=0, max_size=40, unique=True),
    cap=st.integers(1, 9),
)
def test_chunks_cover_every_block_once_in_order(slots, cap):
    offsets = [s * S for s in slots]
    seen = []
    for chunk in chunks(offsets, S, cap):
        assert sum(p.count for p in chunk) <= cap
        for p in chunk:
            assert [p.offset + k * S for k in range(p.count)] == offsets[p.first : p.first + p.count]
            seen.extend(range(p.first, p.first + p.count))
    assert seen == list(range(len(offsets)))
