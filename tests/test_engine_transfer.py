"""How a transfer's slots are cut into chunks and runs of consecutive slots."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pegaflow.engine.transfer import Piece, chunk_runs, pieces

S = 4096


def test_pieces_follow_consecutive_slots_and_chunk_boundaries():
    offsets = [0, S, 2 * S, 10 * S, 11 * S, 5 * S]
    assert pieces(offsets, S, 100) == [Piece(0, 0, 3), Piece(3, 10 * S, 2), Piece(5, 5 * S, 1)]
    # cut at every multiple of 2 blocks as well
    assert pieces(offsets, S, 2) == [Piece(0, 0, 2), Piece(2, 2 * S, 1), Piece(3, 10 * S, 1), Piece(4, 11 * S, 1),
                                     Piece(5, 5 * S, 1)]
    assert pieces([], S, 4) == []


def test_chunk_runs_hold_at_most_max_count_blocks():
    offsets = [i * S for i in range(7)]
    assert chunk_runs(offsets, S, 3) == [(0, 3, [Piece(0, 0, 3)]), (3, 3, [Piece(3, 3 * S, 3)]),
                                         (6, 1, [Piece(6, 6 * S, 1)])]


@given(st.lists(st.integers(0, 63), unique=True, max_size=40), st.integers(1, 9))
def test_chunk_runs_cover_every_block_once_in_order(slots, cap):
    offsets = [s * S for s in slots]
    seen = []
    for first, count, parts in chunk_runs(offsets, S, cap):
        assert first % cap == 0 and 0 < count <= cap
        assert sum(p.count for p in parts) == count and parts[0].first == first
        for p in parts:
            assert p.count >= 1
            for j in range(p.count):
                assert offsets[p.first + j] == p.offset + j * S  # consecutive slots within a piece
                seen.append(p.first + j)
    assert seen == list(range(len(offsets)))
