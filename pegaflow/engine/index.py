"""Which blocks the pool holds: content-hash entries, their slots, states, pins and LRU order.

Key: ``(namespace, block hash)``. An entry holds one slot per stored rank (one if the
instance's pages are replicated). It is WRITING from its first save until every rank's copy
has completed, then READY; only READY entries are hits or loadable. A load pins its entries
for the copy's duration; a pinned entry leaves the LRU order, so eviction, which takes the
least recently used READY entry, never sees it. Eviction happens on demand when a save needs
room and is atomic: it frees enough for the request or changes nothing.

Queries are the hot path (the scheduler asks for every waiting request, every step), so a
query does no per-hash Python work. With numba, the wire blob is probed in place by a
compiled set that mirrors the keys of the namespace's READY dict (``hash_set.py``), and the
hits are logged as the blob's prefix (:class:`BlobHits`), looked up in the dict only when
applied. Without it, the hashes are split and looked up in C (one ``operator.itemgetter``
call over that dict) and logged as one tuple of entries. The log is applied to the LRU order (a move to the end for each hit still in it,
in order) before anything reads or changes that order, when it holds more than
``TOUCH_LOG_LIMIT`` hits, and when the owner asks (:meth:`BlockIndex.apply_touches`, in slices
if it likes: the server applies it while no request waits). A query whose hits start with
every hit of the previous one (the same prompt asked again, a longer prefix of it) replaces
that one in the log: each entry's last touch alone decides its place. The order is then
exactly the one an immediate refresh would give (``tests/test_index.py`` checks it against an
eager model).

Entries some ranks never finish are reclaimed ``write_timeout_s`` after creation (checked on
every save and query); an entry reclaimed while a copy into it is still in flight keeps its
slots until that copy completes.

Thread-safe: every public method holds one lock; nothing in it waits on I/O or the GPU.
"""

from __future__ import annotations

import functools
import logging
import operator
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, islice, repeat

from pegaflow.engine import hash_set
from pegaflow.engine.allocator import SlotAllocator

logger = logging.getLogger(__name__)

Key = tuple[str, bytes]

WRITING = "writing"
READY = "ready"

# Pending LRU touches applied at once beyond this many (bounds the log's memory: 64k entry
# references, ~0.5 MiB). Applying 1,000 costs ~120-190 us on the dev machine in an index of
# 200k entries (cache misses in the LRU's links), ~30-55 us in a small one.
TOUCH_LOG_LIMIT = 1 << 16

# Hashes are split by at most this many at a time: the cached splitters stay small (a struct
# format of 131,072 hashes holds ~4 MiB), and a query that misses early splits little more.
SPLIT_CHUNK = 1024

_drain = deque(maxlen=0).extend  # runs an iterator to its end in C (itertools' "consume")


class Batch:
    """The entries one save created, for the write timeout: one record per save, not per block.

    ``remaining`` counts those still WRITING; at zero the batch lets go of its entries.
    """

    __slots__ = ("created", "entries", "remaining")

    def __init__(self, created: float, count: int) -> None:
        self.created = created
        self.entries: list[Entry] | None = None
        self.remaining = count


class Entry:
    """One block of one namespace: a slot per stored rank.

    ``written`` and ``in_flight`` are bitmasks over the stored ranks (bit r: rank r's copy is
    complete / in progress); the entry is READY when every bit of ``full`` is written.
    Identity is the object: a key dropped and saved again is a new entry.
    """

    __slots__ = ("namespace", "hash", "slot_bytes", "slots", "nbytes", "batch", "written", "in_flight", "full",
                 "pins", "dead")

    def __init__(self, namespace: str, h: bytes, slot_bytes: int, slots: tuple[int, ...], batch: Batch | None,
                 in_flight: int) -> None:
        self.namespace = namespace
        self.hash = h
        self.slot_bytes = slot_bytes
        self.slots = slots  # byte offset of each stored rank's slot in the pool; () once freed
        self.nbytes = slot_bytes * len(slots)  # the bytes its slots hold (as made; kept once freed)
        self.batch = batch  # the save that created it (its creation time)
        self.written = 0
        self.in_flight = in_flight
        self.full = (1 << len(slots)) - 1
        self.pins = 0
        self.dead = False  # removed from the index; slots freed once nothing is in flight

    @property
    def key(self) -> Key:
        return (self.namespace, self.hash)

    @property
    def state(self) -> str:
        return READY if self.written == self.full else WRITING

    def __repr__(self) -> str:
        return f"Entry({self.namespace!r}, {self.hash.hex()[:16]}, {self.state}, pins={self.pins})"


class SavePlan:
    """What one save writes: ``writes[j] = (index in the call, entry)``; the rest are skipped."""

    __slots__ = ("writes", "skipped", "stored_rank", "_offsets")

    def __init__(self, writes: tuple[tuple[int, Entry], ...], skipped: tuple[int, ...], stored_rank: int,
                 offsets: list[int] | None = None) -> None:
        self.writes = writes
        self.skipped = skipped
        self.stored_rank = stored_rank
        self._offsets = offsets

    def positions(self) -> list[int]:
        """The writes' indices in the call, in order."""
        return [i for i, _ in self.writes]

    def offsets(self) -> list[int]:
        """The pool offset of each write's slot for this plan's rank, in order."""
        if self._offsets is None:
            r = self.stored_rank
            return [entry.slots[r] for _, entry in self.writes]
        return list(self._offsets)


class LoadPlan:
    """What one load reads: ``reads[j] = (index in the call, entry)``, pinned until released."""

    __slots__ = ("reads", "missing", "stored_rank")

    def __init__(self, reads: tuple[tuple[int, Entry], ...], missing: tuple[int, ...], stored_rank: int) -> None:
        self.reads = reads
        self.missing = missing
        self.stored_rank = stored_rank

    def positions(self) -> list[int]:
        """The reads' indices in the call, in order."""
        return [i for i, _ in self.reads]

    def offsets(self) -> list[int]:
        r = self.stored_rank
        return [entry.slots[r] for _, entry in self.reads]


class BlobHits:
    """A query's hits: the leading ``count`` hashes of its wire blob, looked up in the
    namespace's READY dict (``table``) only when the LRU refresh is applied, off the reply's
    path. Nothing is added to an index with touches logged, so a hash found then is the
    entry the query hit, and one gone since is skipped (as a dropped entry is)."""

    __slots__ = ("table", "blob", "hash_bytes", "count")

    def __init__(self, table: dict[bytes, Entry], blob: bytes, hash_bytes: int, count: int) -> None:
        self.table = table
        self.blob = blob
        self.hash_bytes = hash_bytes
        self.count = count

    def __len__(self) -> int:
        return self.count

    def prefix(self) -> bytes:
        """The hits' bytes of the blob."""
        size = self.count * self.hash_bytes
        return self.blob if size == len(self.blob) else self.blob[:size]

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[Entry | None]:
        end = self.count if end is None else end
        size = self.hash_bytes
        return map(self.table.get, _iter_hashes(self.blob[start * size:end * size], size, end - start))


Hits = tuple[Entry, ...] | BlobHits


def _extends(last: Hits, hits: Hits) -> bool:
    """Whether ``hits`` starts with every hit of ``last`` (``len(last) <= len(hits)``)."""
    if type(last) is BlobHits and type(hits) is BlobHits:
        return (last.table is hits.table and last.hash_bytes == hits.hash_bytes
                and hits.blob.startswith(last.prefix()))
    if type(last) is BlobHits:  # a list query after a blob query, or the other way round
        last = tuple(last.entries())
    if type(hits) is BlobHits:
        hits = tuple(hits.entries())
    m = len(last)
    return last[0] is hits[0] and (last == hits if m == len(hits) else last == hits[:m])


def _pending_entries(hits: Hits, start: int, end: int) -> Iterable[Entry]:
    if type(hits) is BlobHits:
        return hits.entries(start, end)
    return hits if start == 0 and end == len(hits) else islice(hits, start, end)


def split_hashes(blob: bytes, size: int) -> tuple[bytes, ...]:
    """The ``size``-byte hashes of ``blob``, back to back (the wire form), split in C.

    Each piece is exactly ``size`` bytes by construction, so no per-hash check is needed.
    1,000 hashes of 32 bytes: ~18 us on the dev machine (numpy's ``V32`` view and ``tolist``:
    ~21 us; Python slicing: ~100 us).
    """
    return tuple(_iter_hashes(blob, size, _hash_count(blob, size)))


def _hash_count(blob: bytes, size: int) -> int:
    count, rest = divmod(len(blob), size) if size > 0 else (0, 1)
    if rest:
        raise ValueError(f"{len(blob)} bytes of hashes are not a whole number of {size}-byte hashes")
    return count


def _iter_hashes(blob: bytes, size: int, count: int) -> Iterator[bytes]:
    """The hashes of ``blob``; beyond ``SPLIT_CHUNK`` of them, split lazily chunk by chunk."""
    if count <= SPLIT_CHUNK:
        return iter(_splitter(size, count).unpack(blob))
    whole = count - count % SPLIT_CHUNK
    chunks = _splitter(size, SPLIT_CHUNK).iter_unpack(memoryview(blob)[: whole * size])
    return chain(chain.from_iterable(chunks), _splitter(size, count - whole).unpack_from(blob, whole * size))


def _hash_chunks(blob: bytes, size: int, count: int) -> Iterator[tuple[bytes, ...]]:
    """The hashes of ``blob`` as tuples of at most ``SPLIT_CHUNK``, split lazily."""
    if count <= SPLIT_CHUNK:
        yield _splitter(size, count).unpack(blob)
        return
    whole = count - count % SPLIT_CHUNK
    yield from _splitter(size, SPLIT_CHUNK).iter_unpack(memoryview(blob)[: whole * size])
    if whole < count:
        yield _splitter(size, count - whole).unpack_from(blob, whole * size)


def _lookup(table: dict[bytes, Entry], chunk: tuple[bytes, ...]) -> tuple[Entry, ...]:
    """The entries of ``chunk``'s hashes up to the first one ``table`` lacks.

    One ``itemgetter`` call looks them all up in C: 1,000 hashes ~15 us less than ``map`` over
    ``table.__getitem__`` on the dev machine (no Python call per hash).
    """
    if len(chunk) < 2:  # itemgetter of one key returns the value, not a tuple
        entry = table.get(chunk[0]) if chunk else None
        return () if entry is None else (entry,)
    try:
        return operator.itemgetter(*chunk)(table)
    except KeyError as exc:
        # The first missing hash is the one that raised (an earlier copy of it would have).
        n = chunk.index(exc.args[0])
    return _lookup(table, chunk[:n])


@functools.lru_cache(maxsize=256)
def _splitter(size: int, count: int) -> struct.Struct:
    return struct.Struct(f"{size}s" * count)


class BlockIndex:
    """The pool's table of contents; owns the slot allocator."""

    def __init__(self, capacity: int, write_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 compiled: bool = True) -> None:
        """``compiled``: mirror READY hashes in numba-compiled sets for queries, if numba works."""
        self.allocator = SlotAllocator(capacity)
        self.compiled = compiled and hash_set.warm_up()
        # Per namespace, the compiled mirror of _ready[namespace]'s keys (queries of its hash length
        # read it, not the dict), or None where its hashes do not fit one (mixed lengths).
        self._sets: dict[str, hash_set.HashSet | None] = {}
        self.write_timeout_s = write_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        # Live entries by namespace, then hash: READY ones (pinned or not; what a query sees)
        # and WRITING ones apart, so an entry goes into the large READY table once (an insert
        # there costs ~0.5 us on the dev machine with 200k entries: cache misses).
        self._ready: dict[str, dict[bytes, Entry]] = {}
        self._pending: dict[str, dict[bytes, Entry]] = {}
        self._lru: OrderedDict[Entry, None] = OrderedDict()  # READY and unpinned, least recently used first
        # Saves' new entries by creation time, for the write timeout: a batch per save, so an
        # entry costs no insert and delete of its own there (an OrderedDict's took ~0.4 us a
        # block on the dev machine). Batches whose entries are all READY or dropped leave it
        # from the front, or all at once when nothing is WRITING.
        self._batches: deque[Batch] = deque()
        self._writing = 0  # WRITING entries
        # Query hits not yet applied to _lru, one Hits per query, oldest first; the first
        # _touch_head of the oldest are applied already; _touch_count: those not yet applied.
        self._touches: deque[Hits] = deque()
        self._touch_head = 0
        self._touch_count = 0
        self._pinned = 0  # entries with pins > 0
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "write_timeouts": 0, "no_room": 0, "dropped": 0}

    # -- queries ------------------------------------------------------------------------

    def query(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """Length of the longest prefix of READY entries; refreshes their LRU places."""
        # The dicts, not the compiled set: these are bytes objects already, whose hashes
        # Python may have cached (the engine's own callers ask again with the same objects).
        with self._lock:
            return self._query(namespace, (tuple(hashes),) if hashes else (), len(hashes))

    def query_blob(self, namespace: str, blob: bytes, hash_bytes: int) -> int:
        """:meth:`query` of the ``hash_bytes``-byte hashes back to back in ``blob`` (the wire form)."""
        count = _hash_count(blob, hash_bytes)
        with self._lock:
            compiled = self._sets.get(namespace)
            if compiled is not None and compiled.hash_bytes == hash_bytes:
                return self._query_set(namespace, compiled, blob)
            table = self._ready.get(namespace)
            # A miss at once (a new prompt) costs no split.
            if not count or table is None or blob[:hash_bytes] not in table:
                return self._query(namespace, (), count)
            return self._query(namespace, _hash_chunks(blob, hash_bytes, count), count)

    def _query(self, namespace: str, chunks: Iterable[tuple[bytes, ...]], count: int) -> int:
        """The hits of ``chunks`` (the query's hashes, in pieces) up to the first miss, logged."""
        if self._writing:
            self._reclaim_expired()
        table = self._ready.get(namespace)
        hits: tuple[Entry, ...] = ()
        if table is not None:
            parts = []
            for chunk in chunks:
                found = _lookup(table, chunk)
                parts.append(found)
                if len(found) < len(chunk):
                    break
            hits = parts[0] if len(parts) == 1 else tuple(chain.from_iterable(parts))
        n = len(hits)
        if n:
            self._log_touches(hits)
        counters = self.counters
        counters["hits"] += n
        counters["misses"] += count - n
        return n

    def _query_set(self, namespace: str, held: hash_set.HashSet, blob: bytes) -> int:
        """:meth:`_query` through the namespace's compiled set: no Python step per hash."""
        if self._writing:
            self._reclaim_expired()  # drops WRITING entries only: the set is unchanged
        n = held.prefix(blob)
        if n:
            self._log_touches(BlobHits(self._ready[namespace], bytes(blob), held.hash_bytes, n))
        counters = self.counters
        counters["hits"] += n
        counters["misses"] += len(blob) // held.hash_bytes - n
        return n

    def _log_touches(self, hits: Hits) -> None:
        touches = self._touches
        if touches:
            # The previous query's hits all touched again, later and in the same order: its
            # touches change nothing the new ones do not (each entry's last touch decides).
            last = touches[-1]
            m = len(last)
            if m <= len(hits) and _extends(last, hits):
                touches.pop()
                if touches:
                    self._touch_count -= m
                else:  # it was the head: part of it may be applied already
                    self._touch_count -= m - self._touch_head
                    self._touch_head = 0
        touches.append(hits)
        self._touch_count += len(hits)
        if self._touch_count > TOUCH_LOG_LIMIT:
            self._apply_touches()

    def apply_touches(self, limit: int | None = None) -> bool:
        """Apply the LRU refreshes that queries logged, at most ``limit`` of them; True if some remain.

        Optional: the index applies them itself whenever it must. A server calls this after a
        query's reply is out, in small slices while no request waits (~0.03-0.2 us per hit).
        """
        with self._lock:
            self._apply_touches(limit)
            return bool(self._touches)

    def pending_touches(self) -> int:
        """Query hits logged and not yet applied to the LRU order."""
        return self._touch_count

    def state_of(self, namespace: str, h: bytes) -> str | None:
        """READY, WRITING or None (for tests and diagnostics)."""
        with self._lock:
            entry = self._ready.get(namespace, {}).get(h) or self._pending.get(namespace, {}).get(h)
            return None if entry is None else entry.state

    def lru_keys(self) -> list[Key]:
        """Evictable keys, least recently used first (for tests).

        The logged touches are applied to a copy: asking changes nothing, not even when the
        log is applied.
        """
        with self._lock:
            order = self._lru.copy()
            for i, hits in enumerate(self._touches):
                pending = _pending_entries(hits, self._touch_head if i == 0 else 0, len(hits))
                _drain(map(order.move_to_end, filter(order.__contains__, pending)))
            return [entry.key for entry in order]

    def __len__(self) -> int:
        return self._count

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counters,
                "entries": self._count,
                "entries_ready": self._count - self._writing,
                "entries_writing": self._writing,
                "entries_pinned": self._pinned,
                "pool_used": self.allocator.used_bytes,
                "pool_free": self.allocator.free_bytes,
            }

    # -- saves --------------------------------------------------------------------------

    def prepare_save(
        self, namespace: str, hashes: Sequence[bytes], stored_rank: int, stored_ranks: int, slot_bytes: int
    ) -> SavePlan:
        """Claim slots for the hashes this rank must write; mark those copies in flight.

        A hash already READY (or whose slot for this rank is written or being written) is
        skipped and its LRU place refreshed. New entries get ``stored_ranks`` slots each,
        evicting LRU entries if needed; those that still find no room are skipped.
        """
        bit = 1 << stored_rank
        with self._lock:
            self._apply_touches()
            self._reclaim_expired()
            ready = self._ready.get(namespace)
            found = list(map(ready.get, hashes)) if ready else [None] * len(hashes)
            pending = self._pending.get(namespace)
            if pending:
                found = [e or pending.get(h) for e, h in zip(found, hashes)]
            if not any(found) and len(set(hashes)) == len(hashes):
                # The common save: every hash new, none repeated.
                positions, entries, offsets = self._create(namespace, hashes, stored_ranks, slot_bytes, bit)
                no_room = tuple(range(len(entries), len(hashes)))
                self.counters["no_room"] += len(no_room)
                return SavePlan(tuple(zip(positions, entries)), no_room, stored_rank, offsets)
            writes: list[tuple[int, Entry]] = []
            skipped: list[int] = []
            fresh_positions: list[int] = []
            fresh: list[bytes] = []
            seen: set[bytes] = set()
            lru = self._lru
            for i, (h, entry) in enumerate(zip(hashes, found)):
                if h in seen:
                    skipped.append(i)
                    continue
                seen.add(h)
                if entry is None:
                    fresh_positions.append(i)
                    fresh.append(h)
                elif entry.written == entry.full:  # READY
                    if entry in lru:
                        lru.move_to_end(entry)
                    skipped.append(i)
                elif (entry.written | entry.in_flight) & bit:
                    skipped.append(i)
                else:
                    entry.in_flight |= bit
                    writes.append((i, entry))
            if fresh:
                created, entries, _ = self._create(namespace, fresh, stored_ranks, slot_bytes, bit)
                placed = [fresh_positions[j] for j in created]
                no_room = fresh_positions[len(placed):]
                self.counters["no_room"] += len(no_room)
                if writes:
                    writes.extend(zip(placed, entries))
                    writes.sort(key=_first)
                else:
                    writes = list(zip(placed, entries))
                if skipped and no_room:
                    skipped = sorted(skipped + no_room)
                else:
                    skipped = skipped or no_room
            return SavePlan(tuple(writes), tuple(skipped), stored_rank)

    def complete_save(self, plan: SavePlan, ok: bool) -> None:
        """The plan's copy has completed (``ok``) or failed: entries advance or are dropped."""
        bit = 1 << plan.stored_rank
        clear = ~bit
        with self._lock:
            self._apply_touches()
            ready: list[Entry] = []
            for _, entry in plan.writes:
                entry.in_flight &= clear
                if entry.dead:
                    self._release_if_idle(entry)
                elif not ok:
                    # A failed copy leaves the slot's bytes unknown: drop the whole entry.
                    self._drop(entry)
                    self._release_if_idle(entry)
                else:
                    entry.written |= bit
                    if entry.written == entry.full:
                        ready.append(entry)
            if ready:
                self._left_writing(ready)
                # Inserted one by one from C: no temporary dict (512 entries: ~95 us, not ~125).
                _drain(map(self._lru.__setitem__, ready, repeat(None)))
                ns = ready[0].namespace  # a plan is of one namespace (prepare_save's)
                hashes = list(map(_hash_of, ready))
                pending = self._pending[ns]
                _drain(map(pending.__delitem__, hashes))
                if not pending:
                    del self._pending[ns]
                self._ready.setdefault(ns, {}).update(zip(hashes, ready))
                if self.compiled:
                    self._mirror_add(ns, hashes)

    def drop_namespace(self, namespace: str) -> int:
        """Forget every block of ``namespace`` (vLLM's prefix-cache reset, e.g. after new weights).

        Nothing of it is a hit or loadable afterwards. Slots of copies still in flight are freed
        when those copies complete; a load that already started finishes from its stable copy.
        """
        with self._lock:
            entries = [*self._ready.get(namespace, {}).values(), *self._pending.get(namespace, {}).values()]
            for entry in entries:
                self._drop(entry)
                self._release_if_idle(entry)
            self.counters["dropped"] += len(entries)
            return len(entries)

    # -- loads --------------------------------------------------------------------------

    def prepare_load(self, namespace: str, hashes: Sequence[bytes], stored_rank: int) -> LoadPlan:
        """Pin the READY entries of ``hashes``; the others are ``missing``."""
        with self._lock:
            # Leaving the LRU order commutes with pending touches (a touch of an entry not in
            # it is a no-op, and it is applied before the unpin puts the entry back).
            table = self._ready.get(namespace) or {}
            found = list(map(table.get, hashes))
            lru = self._lru
            pinned = 0
            for entry in found:
                if entry is not None:
                    if not entry.pins:
                        del lru[entry]
                        pinned += 1
                    entry.pins += 1
            self._pinned += pinned
            if pinned == len(found):  # every hash held once: the common load
                return LoadPlan(tuple(enumerate(found)), (), stored_rank)
            reads = tuple((i, entry) for i, entry in enumerate(found) if entry is not None)
            missing = tuple(i for i, entry in enumerate(found) if entry is None)
            return LoadPlan(reads, missing, stored_rank)

    def unpin(self, plan: LoadPlan) -> None:
        """Release a load's pins (once per plan: the caller keeps track)."""
        with self._lock:
            self._apply_touches()  # touches logged while pinned were no-ops: keep them so
            lru = self._lru
            for _, entry in plan.reads:
                assert entry.pins > 0, "unpin of an entry that is not pinned"
                entry.pins -= 1
                if not entry.pins:
                    self._pinned -= 1
                    if entry.dead:
                        self._release_if_idle(entry)
                    else:
                        lru[entry] = None  # most recently used

    def forget(self, plan: LoadPlan) -> None:
        """A failed load: its entries stop being advertised (vLLM must not loop on them)."""
        with self._lock:
            for _, entry in plan.reads:
                if not entry.dead:
                    self._drop(entry)
                self._release_if_idle(entry)

    # -- internals ----------------------------------------------------------------------

    def _apply_touches(self, limit: int | None = None) -> None:
        """Move logged hits still evictable to the LRU end, in the order they were hit: the
        oldest ``limit`` of them (all if None)."""
        touches = self._touches
        budget = self._touch_count if limit is None else limit
        while touches and budget > 0:
            hits = touches[0]
            start = self._touch_head
            end = min(len(hits), start + budget)
            self._move_to_end(hits, start, end)
            budget -= end - start
            self._touch_count -= end - start
            if end == len(hits):
                touches.popleft()
                self._touch_head = 0
            else:
                self._touch_head = end

    def _move_to_end(self, hits: Hits, start: int, end: int) -> None:
        lru = self._lru
        if not self._pinned:
            # Without pins every logged hit is still in the order (unless dropped since: then
            # KeyError, and the filtered pass below; moving the first ones twice is harmless,
            # the second pass leaves them where the first alone would).
            try:
                _drain(map(lru.move_to_end, _pending_entries(hits, start, end)))
                return
            except KeyError:
                pass
        _drain(map(lru.move_to_end, filter(lru.__contains__, _pending_entries(hits, start, end))))

    def _create(
        self, namespace: str, fresh: Sequence[bytes], stored_ranks: int, slot_bytes: int, in_flight: int
    ) -> tuple[Sequence[int], list[Entry], list[int] | None]:
        """New WRITING entries for ``fresh``, all of them if room can be made, else a prefix.

        Returns their indices in ``fresh``, the entries, and (when all fit) the slot offsets of
        the rank ``in_flight`` names, in order.
        """
        count = len(fresh)
        offsets = self._reserve(count * stored_ranks, slot_bytes)
        rank_offsets = None
        if offsets is not None:
            # Rank-major: each rank's slots for this save are contiguous, so one rank's save
            # is one DMA per run.
            per_rank = [offsets[r * count:(r + 1) * count] for r in range(stored_ranks)]
            slots = list(zip(*per_rank))
            rank_offsets = per_rank[in_flight.bit_length() - 1]
        else:
            # Not all fit: take blocks one at a time, in order (a prefix is what a later
            # query can hit), until the pool holds no more.
            slots = []
            for _ in range(count):
                got = self._reserve(stored_ranks, slot_bytes)
                if got is None:
                    break
                slots.append(tuple(got))
            count = len(slots)
        batch = Batch(self._clock(), count)
        # map over repeat() calls the constructor from C: no comprehension frame per entry.
        entries = list(map(Entry, repeat(namespace, count), fresh, repeat(slot_bytes), slots, repeat(batch),
                           repeat(in_flight)))
        self._pending.setdefault(namespace, {}).update(zip(fresh, entries))
        if count:
            batch.entries = entries
            self._batches.append(batch)
            self._writing += count
        self._count += count
        return range(count), entries, rank_offsets

    def _reserve(self, count: int, slot_bytes: int) -> list[int] | None:
        """Offsets of ``count`` slots, evicting LRU entries if needed; None and no change if impossible.

        Victims are taken in LRU order until their bytes could cover the shortfall, then freed
        together as merged runs: a save that evicts hundreds of blocks makes a few allocator
        calls, not one per slot (one per slot cost ~30 ms per 512-block save).
        """
        alloc = self.allocator
        evicted: list[Entry] = []
        while not alloc.can_allocate(count, slot_bytes):
            shortfall = max(count * slot_bytes - alloc.free_bytes, slot_bytes)
            batch = self._evict_lru(shortfall)
            if not batch:
                self._restore(evicted)
                return None
            for offset, nbytes in _merged_runs(batch):
                alloc.free(offset, nbytes)
            evicted.extend(batch)
        runs = alloc.allocate(count, slot_bytes)
        assert runs is not None
        for victim in evicted:
            victim.dead = True
        self.counters["evictions"] += len(evicted)
        if len(runs) == 1:
            start = runs[0].offset
            return list(range(start, start + count * slot_bytes, slot_bytes))
        # Ranges expanded in C: after evictions a save's slots come in many runs (512 blocks
        # of two ranks: ~200 us as a comprehension on the dev machine).
        return list(chain.from_iterable(range(run.offset, run.offset + run.count * slot_bytes, slot_bytes)
                                        for run in runs))

    def _evict_lru(self, shortfall: int) -> list[Entry]:
        """Take least recently used entries out of the index until their bytes cover
        ``shortfall`` (or none are left), oldest first.

        Runs of victims as large as the oldest go in one step (a slice of the order, deleted
        and unindexed in C): a 512-block save's eviction cost ~0.8 ms of Python one by one on
        the dev machine. Where the slice mixes sizes or namespaces its entries go one by one,
        each counted at its own size, so exactly the same entries go. (Taking only the oldest
        and slicing again re-read up to a shortfall's worth of entries per victim: a 512-block
        save of 4.4 MiB slots evicting 0.6-0.9 MiB entries of other models took ~280 ms.)
        """
        lru = self._lru
        ready = self._ready  # LRU entries are READY
        batch: list[Entry] = []
        while lru and shortfall > 0:
            oldest = next(iter(lru))
            size = oldest.nbytes
            namespace = oldest.namespace
            taken = list(islice(lru, min(len(lru), -(-shortfall // size))))
            uniform = set(map(_nbytes_of, taken)) == {size} and set(map(_namespace_of, taken)) == {namespace}
            if len(taken) > 1 and uniform:
                _drain(map(lru.__delitem__, taken))
                _drain(map(ready[namespace].__delitem__, map(_hash_of, taken)))
                by_namespace = {namespace: taken}
                shortfall -= size * len(taken)
            else:
                by_namespace = {}
                for i, victim in enumerate(taken):
                    if shortfall <= 0:
                        del taken[i:]
                        break
                    del lru[victim]
                    del ready[victim.namespace][victim.hash]
                    by_namespace.setdefault(victim.namespace, []).append(victim)
                    shortfall -= victim.nbytes
            self._count -= len(taken)
            for name, victims in by_namespace.items():  # one mirror call per namespace
                if self.compiled:
                    self._mirror_remove(name, victims)
                if not ready[name]:
                    del ready[name]
                    self._sets.pop(name, None)
            batch += taken
        return batch

    def _restore(self, evicted: list[Entry]) -> None:
        """Undo an eviction that could not make room: the allocator and index are unchanged."""
        for offset, nbytes in _merged_runs(evicted):
            self.allocator.reserve(offset, nbytes)
        for entry in reversed(evicted):
            self._put_ready(entry)
            self._lru[entry] = None
            self._lru.move_to_end(entry, last=False)

    def _reclaim_expired(self) -> None:
        batches = self._batches
        if not batches:
            return
        deadline = self._clock() - self.write_timeout_s
        while batches:
            batch = batches[0]
            if batch.remaining and batch.created > deadline:
                break
            batches.popleft()
            if not batch.remaining:
                continue
            # remaining > 0: the batch still holds its entries, and exactly that many are late.
            late = [e for e in batch.entries if not e.dead and e.written != e.full]
            batch.entries = None
            logger.warning("%d block(s) of %s not written by every rank in %.1f s: reclaimed (first %s)",
                           len(late), late[0].namespace, self.write_timeout_s, late[0].hash.hex()[:16])
            self.counters["write_timeouts"] += len(late)
            for entry in late:
                self._drop(entry)
                self._release_if_idle(entry)

    def _left_writing(self, entries: Sequence[Entry]) -> None:
        """``entries`` (WRITING until now) became READY or were dropped."""
        for entry in entries:
            batch = entry.batch
            batch.remaining -= 1
            if not batch.remaining:
                batch.entries = None
        self._writing -= len(entries)
        if not self._writing:
            self._batches.clear()

    def _drop(self, entry: Entry) -> None:
        """Remove from every table; the caller frees the slots when nothing is in flight."""
        entry.dead = True
        self._pop(entry)
        self._lru.pop(entry, None)

    def _put_ready(self, entry: Entry) -> None:
        self._ready.setdefault(entry.namespace, {})[entry.hash] = entry
        if self.compiled:
            self._mirror_add(entry.namespace, [entry.hash])
        self._count += 1

    def _pop(self, entry: Entry) -> None:
        writing = entry.written != entry.full
        tables = self._pending if writing else self._ready
        table = tables[entry.namespace]
        del table[entry.hash]
        if not writing and self.compiled:
            self._mirror_remove(entry.namespace, (entry,))
        if not table:
            del tables[entry.namespace]
            if not writing:
                self._sets.pop(entry.namespace, None)
        self._count -= 1
        if writing:
            self._left_writing((entry,))

    def _mirror_add(self, namespace: str, hashes: Sequence[bytes]) -> None:
        """Add READY hashes to the namespace's compiled set (made on its first hash)."""
        sets = self._sets
        held = sets.get(namespace, _NO_SET)
        if held is _NO_SET:
            try:
                held = hash_set.HashSet(len(hashes[0]))
            except ValueError:  # a length no set holds (not a multiple of 8 bytes)
                held = None
            sets[namespace] = held
        if held is None:
            return
        assert not self._touches, "the touch log is applied before anything is added"
        try:
            held.add(hashes)
        except ValueError:
            # A hash of another length: this namespace's queries use the dict from now on.
            sets[namespace] = None

    def _mirror_remove(self, namespace: str, entries: Sequence[Entry]) -> None:
        """Take READY entries' hashes out of the namespace's compiled set, if it has one."""
        held = self._sets.get(namespace)
        if held is not None:
            held.remove(list(map(_hash_of, entries)))

    def _release_if_idle(self, entry: Entry) -> None:
        """Free a dead entry's slots once no copy writes or reads them."""
        if entry.dead and entry.slots and not entry.pins and not entry.in_flight:
            for offset in entry.slots:
                self.allocator.free(offset, entry.slot_bytes)
            entry.slots = ()


def _first(pair: tuple[int, Entry]) -> int:
    return pair[0]


_NO_SET = object()

_hash_of = operator.attrgetter("hash")


_namespace_of = operator.attrgetter("namespace")
_slots_of = operator.attrgetter("slots")
_slot_bytes_of = operator.attrgetter("slot_bytes")
_nbytes_of = operator.attrgetter("nbytes")


def _merged_runs(entries: list[Entry]) -> list[tuple[int, int]]:
    """The entries' slots as sorted (offset, nbytes) runs, adjacent slots merged."""
    sizes = set(map(_slot_bytes_of, entries))
    if len(sizes) == 1:
        # One slot size (the common case): the offsets sorted as plain ints. On the dev
        # machine, 512 evicted entries: ~75 us in all, against ~170-190 through numpy (whose
        # fromiter over the entries' slot tuples alone took ~90).
        spans: Iterable[tuple[int, int]] = zip(sorted(chain.from_iterable(map(_slots_of, entries))),
                                               repeat(sizes.pop()))
    else:
        spans = sorted((offset, entry.slot_bytes) for entry in entries for offset in entry.slots)
    runs: list[tuple[int, int]] = []
    start = end = -1
    for offset, nbytes in spans:
        if offset != end:
            if end >= 0:
                runs.append((start, end - start))
            start = offset
        end = offset + nbytes
    if end >= 0:
        runs.append((start, end - start))
    return runs
