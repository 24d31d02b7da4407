"""How a transfer's slots are cut into chunks and runs of consecutive slots."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pegaflow.engine.transfer import Piece, block_runs, chunk_runs, pieces, runs

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


def _runs_by_loop(offsets, slot, cap):
    out, start = [], 0
    for j in range(1, len(offsets) + 1):
        if j == len(offsets) or offsets[j] != offsets[j - 1] + slot or j % cap == 0:
            out.append((start, offsets[start], j - start))
            start = j
    return out


@given(st.integers(0, 100), st.integers(0, 300), st.integers(1, 70),
       st.lists(st.tuples(st.integers(0, 299), st.integers(0, 999)), max_size=3))
def test_runs_of_long_jobs_match_the_plain_loop(base, n, cap, changes):
    # Long jobs take the one-run fast path or numpy; both must cut exactly as the loop does.
    offsets = [(base + i) * S for i in range(n)]
    for i, slot in changes:
        if i < n:
            offsets[i] = slot * S
    assert runs(offsets, S, cap) == _runs_by_loop(offsets, S, cap)


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=80))
def test_block_runs_cover_every_block_once_in_consecutive_blocks_and_slots(pairs):
    """Short jobs take the loop, long ones numpy: both must agree with the definition."""
    ids, offsets = [b for b, _ in pairs], [s * S for _, s in pairs]
    out = block_runs(ids, offsets, S)
    flat = [(b + j, off + j * S) for b, off, n in out for j in range(n)]
    assert flat == list(zip(ids, offsets))
    for (b, off, n), (b2, off2, _) in zip(out, out[1:]):
        assert not (b2 == b + n and off2 == off + n * S), "two runs that touch were not merged"
