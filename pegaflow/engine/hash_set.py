"""A compiled set of block hashes: the index's query without a Python step per hash.

A query of 1,000 hashes through Python dicts costs ~120 us on the dev machine: splitting the
wire blob into 1,000 ``bytes`` objects, hashing each, probing. Here the blob is read in place
as 64-bit words and probed by one numba-compiled loop (~10-20 us). A set mirrors the keys of
the index's dict of READY entries for one namespace; the dict stays the authority (and maps
hashes to entries when the query's LRU refreshes are applied later, off the reply's path).
Sets hold hashes of one length, a multiple of 8 bytes (vLLM's 32-byte sha256 and 16-byte
xxhash-128 both are).

Layout: open addressing with linear probing over ``rows`` (one hash per row, all-zero =
empty; the all-zero hash itself is a flag), deletions by backward shift (no tombstones), at
most half full. A row holds the whole hash, so an insert, a removal or a probe touches one
place in memory: on the dev machine a separate key array and an id -> entry list cost
~0.6 us more per block saved and evicted, in cache misses.

Without numba (``AVAILABLE`` is False) nothing here is used and queries go through the dicts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

try:
    import numba
except ImportError:  # optional: the pure-Python index is complete without it
    numba = None

AVAILABLE = numba is not None

_MIN_ROWS = 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads the mixed words


def _jit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


def _jit_inline(fn):
    # Inlined in numba's IR: left as calls, the row helpers below halved the insert rate on
    # the dev machine (LLVM kept the calls, each with its own bounds and error paths).
    return numba.njit(cache=True, nogil=True, inline="always")(fn) if numba is not None else fn


@_jit_inline
def _home(matrix, i, shift):
    # Every word counts: hashes that share their first word (the engine bench's padded text
    # "hashes", or any hash function with a fixed prefix) would all start one probe run, and
    # each insert and removal would walk it. On the H100, 512-block saves of such hashes
    # spent 14 ms a removal and fell to 0.05 of PCIe speed (bench/NOTES.md, session 12).
    # An XOR fold: a multiply between words halved the query rate on the dev machine (116 ->
    # 65 M hashes/s for 32-byte hashes; XOR: ~102).
    h = matrix[i, 0]
    for w in range(1, matrix.shape[1]):
        h ^= matrix[i, w]
    return np.int64((h * _GOLDEN) >> shift)


@_jit_inline
def _empty(matrix, i):
    """Row ``i`` is all zero: an empty row of the set, or the zero hash among queried ones."""
    for w in range(matrix.shape[1]):
        if matrix[i, w] != 0:
            return False
    return True


@_jit_inline
def _same(rows, j, hashes, i):
    for w in range(rows.shape[1]):
        if rows[j, w] != hashes[i, w]:
            return False
    return True


@_jit_inline
def _put(rows, j, source, i):
    # Word by word: a slice assignment (``rows[j, :] = source[i, :]``) builds two array views
    # and cost as much as the cache miss it is there to fill.
    for w in range(rows.shape[1]):
        rows[j, w] = source[i, w]


@_jit_inline
def _clear(rows, j):
    for w in range(rows.shape[1]):
        rows[j, w] = 0


@_jit
def _find(rows, hashes, i, shift, mask):
    """The row holding ``hashes[i]`` (not the zero hash), or -1."""
    j = _home(hashes, i, shift)
    while not _empty(rows, j):
        if _same(rows, j, hashes, i):
            return j
        j = (j + 1) & mask
    return -1


@_jit
def _prefix(rows, hashes, has_zero, shift, mask):
    """How many leading ``hashes`` are held."""
    for i in range(hashes.shape[0]):
        if _empty(hashes, i):
            if not has_zero:
                return i
        elif _find(rows, hashes, i, shift, mask) < 0:
            return i
    return hashes.shape[0]


@_jit
def _insert(rows, hashes, shift, mask):
    """Add ``hashes`` (none held, none zero)."""
    for i in range(hashes.shape[0]):
        j = _home(hashes, i, shift)
        while not _empty(rows, j):
            j = (j + 1) & mask
        _put(rows, j, hashes, i)


@_jit
def _remove(rows, hashes, shift, mask):
    """Take ``hashes`` (none zero) out; returns how many were absent."""
    lost = 0
    for i in range(hashes.shape[0]):
        hole = _find(rows, hashes, i, shift, mask)
        if hole < 0:
            lost += 1
            continue
        # Backward shift: pull later members of the probe run into the hole, so that every
        # member stays reachable from its home without tombstones.
        k = (hole + 1) & mask
        while not _empty(rows, k):
            home = _home(rows, k, shift)
            # k may fill the hole unless its home lies cyclically in (hole, k].
            if (hole < k and (home <= hole or home > k)) or (hole > k and home <= hole and home > k):
                _put(rows, hole, rows, k)
                hole = k
            k = (k + 1) & mask
        _clear(rows, hole)
    return lost


class HashSet:
    """Hashes of one length (``hash_bytes``, a multiple of 8)."""

    def __init__(self, hash_bytes: int) -> None:
        if not AVAILABLE:
            raise RuntimeError("HashSet needs numba")
        if hash_bytes <= 0 or hash_bytes % 8:
            raise ValueError(f"hash length {hash_bytes} is not a positive multiple of 8 bytes")
        self.hash_bytes = hash_bytes
        self._words = hash_bytes // 8
        self._count = 0
        self._has_zero = False
        self._resize(_MIN_ROWS)

    def __len__(self) -> int:
        return self._count

    def _resize(self, count: int) -> None:
        self.rows = np.zeros((count, self._words), dtype=np.uint64)
        self._mask = count - 1
        self._shift = np.uint64(64 - (count.bit_length() - 1))

    def _matrix(self, blob: bytes) -> np.ndarray:
        if len(blob) % self.hash_bytes:
            raise ValueError(f"{len(blob)} bytes are not a whole number of {self.hash_bytes}-byte hashes")
        return np.frombuffer(blob, dtype="<u8").reshape(-1, self._words)

    def prefix(self, blob: bytes) -> int:
        """How many of the blob's leading hashes (back to back) are held."""
        return _prefix(self.rows, self._matrix(blob), self._has_zero, self._shift, self._mask)

    def add(self, hashes: Sequence[bytes]) -> None:
        """Add ``hashes``, none held yet.

        Every hash must be ``hash_bytes`` long: checked for the first and the total only (a
        pass over each costs ~25 ns a hash on the save path), as the index gives one
        namespace hashes of one length (its fingerprint includes the length).
        """
        if not hashes:
            return
        blob = b"".join(hashes)
        if len(hashes[0]) != self.hash_bytes or len(blob) != len(hashes) * self.hash_bytes:
            raise ValueError(f"hashes of {self.hash_bytes} bytes expected")
        matrix, zero = _split_zero(self._matrix(blob))
        if zero:
            self._has_zero = True
            self._count += 1
        if 2 * (self._count + len(matrix)) > len(self.rows):
            self._grow(self._count + len(matrix))
        _insert(self.rows, matrix, self._shift, self._mask)
        self._count += len(matrix)

    def remove(self, hashes: Sequence[bytes]) -> None:
        """Take ``hashes`` out; KeyError (after taking out the others) if some were not held."""
        if not hashes:
            return
        matrix, zero = _split_zero(self._matrix(b"".join(hashes)))
        lost = _remove(self.rows, matrix, self._shift, self._mask)
        self._count -= len(matrix) - lost
        if zero:
            if self._has_zero:
                self._has_zero = False
                self._count -= 1
            else:
                lost += 1
        if lost:
            raise KeyError(f"{lost} hash(es) not in the set")

    def _grow(self, need: int) -> None:
        count = len(self.rows)
        while 2 * need > count:
            count *= 2
        held = self.rows[self.rows.any(axis=1)]
        self._resize(count)
        _insert(self.rows, held, self._shift, self._mask)


def _split_zero(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """``matrix`` without the all-zero hash (a zero row is empty: its presence is a flag), and
    whether it was there. A real hash is zero with odds of 2^-64 or less; one test of the
    first words settles almost every call."""
    if not matrix.shape[0] or matrix[:, 0].all():
        return matrix, False
    zero = ~matrix.any(axis=1)
    return (matrix[~zero], True) if zero.any() else (matrix, False)


@functools.cache
def warm_up() -> bool:
    """Compile (or load from numba's cache) every function once; False if that failed."""
    if not AVAILABLE:
        return False
    try:
        # Each function is compiled per argument type, and numpy arrays read from ``bytes``
        # are read-only while filtered copies and a bytearray's are not: both kinds are
        # exercised here, so that no save, eviction or query compiles on the way.
        held = [b"abcdefgh", b"ijklmnop"]
        table = HashSet(8)
        table.add(held)  # read-only rows in
        table.add([bytes(8), b"qrstuvwx"])  # the zero hash filtered out: a writable copy
        table.add([i.to_bytes(8, "little") for i in range(1, 2 * _MIN_ROWS)])  # grows
        blob = b"".join(held) + bytes(8) + b"qrstuvwx" + b"yzabcdef"
        assert table.prefix(blob) == table.prefix(bytearray(blob)) == 4
        table.remove(held)
        table.remove([bytes(8), b"qrstuvwx"])
        table.remove([i.to_bytes(8, "little") for i in range(1, 2 * _MIN_ROWS)])
        assert len(table) == 0 and table.prefix(held[0]) == 0
        return True
    except Exception:  # a broken numba install must not take the index down with it
        logger.warning("compiled hash sets unavailable: queries use the dict path", exc_info=True)
        return False
