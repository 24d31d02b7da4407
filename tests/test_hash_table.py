"""The compiled hash table against a dict: random adds, removes and prefix lookups (hypothesis),
with hashes that share their first word (same home slot, long probe runs, wrap-around)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow.engine import hash_table

pytestmark = pytest.mark.skipif(not hash_table.warm_up(), reason="numba is not installed")


_INVERSE = pow(int(hash_table._GOLDEN), -1, 1 << 64)


def _word_at(top: int) -> bytes:
    """A first word whose home slot is where ``top``'s leading bits point, in a table of any size."""
    return ((top * _INVERSE) % (1 << 64)).to_bytes(8, "little")


def _universe(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` distinct hashes. First words: a quarter home in the last slot (their probe runs
    wrap around to slot 0), a quarter in slot 0, and where the length allows a quarter share
    one word outright; the rest random."""
    rng = random.Random(seed)
    out: list[bytes] = []
    shared = rng.randbytes(8)
    while len(out) < count:
        group = len(out) % 4
        if group == 0:
            first = _word_at((1 << 64) - 1 - rng.randrange(1 << 40))
        elif group == 1:
            first = _word_at(rng.randrange(1 << 40))
        elif group == 2 and size > 8:
            first = shared
        else:
            first = rng.randbytes(8)
        candidate = first + rng.randbytes(size - 8)
        if candidate not in out:
            out.append(candidate)
    return out


_ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "lookup"]),
                          st.lists(st.integers(0, 39), min_size=1, max_size=40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(size=st.sampled_from([8, 16, 32]), seed=st.integers(0, 1 << 16), ops=_ops)
def test_table_matches_a_dict(size, seed, ops):
    universe = _universe(size, 40, seed)
    table = hash_table.HashTable(size)
    model: dict[bytes, int] = {}
    for op, picks in ops:
        hashes = list(dict.fromkeys(universe[i] for i in picks))
        if op == "add":
            fresh = [x for x in hashes if x not in model]
            if fresh:
                ids = table.add(fresh, [("entry", x) for x in fresh]).tolist()
                assert len(set(ids)) == len(ids) and not set(ids) & set(model.values())
                model.update(zip(fresh, ids))
        elif op == "remove":
            gone = [x for x in hashes if x in model]
            table.remove([model.pop(x) for x in gone])
        else:
            expected = 0
            while expected < len(hashes) and hashes[expected] in model:
                expected += 1
            ids = table.lookup(b"".join(hashes)).tolist()
            assert ids == [model[x] for x in hashes[:expected]]
            assert [table.objs[i] for i in ids] == [("entry", x) for x in hashes[:expected]]
        assert len(table) == len(model)
    # Everything left is still found, from any starting point of the probe runs.
    for x, ident in model.items():
        assert table.lookup(x).tolist() == [ident]


def test_growth_keeps_every_hash():
    table = hash_table.HashTable(32)
    hashes = [os.urandom(32) for _ in range(5000)]
    ids = []
    for start in range(0, len(hashes), 700):
        ids += table.add(hashes[start:start + 700], hashes[start:start + 700]).tolist()
    assert table.lookup(b"".join(hashes)).tolist() == ids
    assert len(table.slots) >= 2 * len(hashes)
    table.remove(ids[::2])
    assert table.lookup(b"".join(hashes[1::2])).tolist() == ids[1::2]
    assert table.lookup(hashes[0] + hashes[1]).tolist() == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        hash_table.HashTable(20)
    table = hash_table.HashTable(16)
    with pytest.raises(ValueError, match="16 bytes"):
        table.add([os.urandom(16), os.urandom(32)], [1, 2])
    with pytest.raises(ValueError, match="16 bytes"):
        table.add([os.urandom(8), os.urandom(24)], [1, 2])  # right total, wrong lengths
    assert len(table) == 0
    (ident,) = table.add([os.urandom(16)], [1]).tolist()
    table.remove([ident])
    with pytest.raises(KeyError):
        table.remove([ident])
