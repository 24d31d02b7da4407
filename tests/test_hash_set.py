"""The compiled hash set against a Python set: random adds, removes and prefix queries
(hypothesis), with hashes that share their first word or home at the ends of the rows (probe
runs that wrap around), and the all-zero hash."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow.engine import hash_set

pytestmark = pytest.mark.skipif(not hash_set.warm_up(), reason="numba is not installed")

_INVERSE = pow(int(hash_set._GOLDEN), -1, 1 << 64)
_MASK64 = (1 << 64) - 1


def _homed_at(top: int, size: int, rng: random.Random) -> bytes:
    """A hash whose home row is where ``top``'s leading bits point, at any table size: random
    words, the last one chosen so that all of them XOR (as ``hash_set._home`` folds them) to
    ``top`` times the inverse of the multiplier."""
    words = [rng.getrandbits(64) for _ in range(size // 8 - 1)]
    last = (top * _INVERSE) & _MASK64
    for w in words:
        last ^= w
    return b"".join(w.to_bytes(8, "little") for w in [*words, last])


def _universe(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` distinct hashes, the all-zero one first. A quarter home in the last row
    (their probe runs wrap around to row 0), a quarter in row 0, and where the length allows
    a quarter share their first word; the rest random."""
    rng = random.Random(seed)
    out = [bytes(size)]
    shared = rng.randbytes(8)
    while len(out) < count:
        group = len(out) % 4
        if group == 0:
            candidate = _homed_at(_MASK64 - rng.randrange(1 << 40), size, rng)
        elif group == 1:
            candidate = _homed_at(rng.randrange(1 << 40), size, rng)
        elif group == 2 and size > 8:
            candidate = shared + rng.randbytes(size - 8)
        else:
            candidate = rng.randbytes(size)
        if candidate not in out:
            out.append(candidate)
    return out


_ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "prefix"]),
                          st.lists(st.integers(0, 39), min_size=1, max_size=40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(size=st.sampled_from([8, 16, 32]), seed=st.integers(0, 1 << 16), ops=_ops)
def test_set_matches_a_python_set(size, seed, ops):
    universe = _universe(size, 40, seed)
    held = hash_set.HashSet(size)
    model: set[bytes] = set()
    for op, picks in ops:
        hashes = list(dict.fromkeys(universe[i] for i in picks))
        if op == "add":
            fresh = [x for x in hashes if x not in model]
            held.add(fresh)
            model.update(fresh)
        elif op == "remove":
            gone = [x for x in hashes if x in model]
            held.remove(gone)
            model.difference_update(gone)
        else:
            expected = 0
            while expected < len(hashes) and hashes[expected] in model:
                expected += 1
            assert held.prefix(b"".join(hashes)) == expected
        assert len(held) == len(model)
    # Everything left is still found, from any starting point of the probe runs.
    for x in universe:
        assert held.prefix(x) == (x in model)


def test_growth_keeps_every_hash():
    held = hash_set.HashSet(32)
    hashes = [os.urandom(32) for _ in range(5000)]
    for start in range(0, len(hashes), 700):
        held.add(hashes[start:start + 700])
    assert held.prefix(b"".join(hashes)) == len(hashes)
    assert len(held.rows) >= 2 * len(hashes)
    held.remove(hashes[::2])
    assert held.prefix(b"".join(hashes[1::2])) == len(hashes) // 2
    assert held.prefix(hashes[1] + hashes[0] + hashes[3]) == 1
    held.add(hashes[::2])
    assert held.prefix(b"".join(hashes)) == len(held) == len(hashes)


def test_hashes_sharing_their_first_words_spread_over_the_rows():
    """Text padded with zeros, as the engine bench makes its hashes: every word counts toward
    a hash's home, so the probe runs stay short (one run of 4,096 rows when only the first
    word counted)."""
    held = hash_set.HashSet(32)
    hashes = [f"qwen2.5-7b/3/{i}".encode().ljust(32, b"\0") for i in range(4096)]
    held.add(hashes)
    assert held.prefix(b"".join(hashes)) == len(hashes)
    longest = run = 0
    for used in held.rows.any(axis=1).tolist() * 2:  # twice round: a run may wrap
        run = run + 1 if used else 0
        longest = max(longest, run)
    assert longest < 64, longest
    held.remove(hashes[::2])
    assert held.prefix(b"".join(hashes[1::2])) == len(hashes) // 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        hash_set.HashSet(20)
    held = hash_set.HashSet(16)
    with pytest.raises(ValueError, match="16 bytes"):
        held.add([os.urandom(16), os.urandom(32)])
    with pytest.raises(ValueError, match="16 bytes"):
        held.add([os.urandom(8), os.urandom(24)])  # right total, wrong first
    with pytest.raises(ValueError, match="whole number"):
        held.prefix(os.urandom(20))
    assert len(held) == 0
    one, other = os.urandom(16), os.urandom(16)
    held.add([one])
    with pytest.raises(KeyError, match="1 hash"):
        held.remove([other, one])
    assert len(held) == 0 and held.prefix(one) == 0
    with pytest.raises(KeyError, match="1 hash"):
        held.remove([bytes(16)])
