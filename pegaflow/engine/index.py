"""Which blocks the pool holds: content-hash entries, their slots, states, pins and LRU order.

Key: ``(namespace, block hash)``. An entry holds one slot per stored rank (one if the
instance's pages are replicated). It is WRITING from its first save until every rank's copy
has completed, then READY; only READY entries are hits or loadable. A load pins its entries
for the copy's duration; a pinned entry leaves the LRU order, so eviction, which takes the
least recently used READY entry, never sees it. Eviction happens on demand when a save needs
room and is atomic: it frees enough for the request or changes nothing.

Entries some ranks never finish are reclaimed ``write_timeout_s`` after creation (checked on
every save and query); an entry reclaimed while a copy into it is still in flight keeps its
slots until that copy completes.

Thread-safe: every public method holds one lock; nothing in it waits on I/O or the GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pegaflow.engine.allocator import SlotAllocator

logger = logging.getLogger(__name__)

Key = tuple[str, bytes]

WRITING = "writing"
READY = "ready"


@dataclass(eq=False)
class Entry:
    """One block of one namespace: a slot per stored rank."""

    key: Key
    slot_bytes: int
    slots: list[int]  # byte offset of each stored rank's slot in the pool
    created: float
    written: list[bool] = field(default_factory=list)
    in_flight: list[bool] = field(default_factory=list)
    state: str = WRITING
    pins: int = 0
    dead: bool = False  # removed from the index (reclaimed); slots freed once nothing is in flight

    def __post_init__(self) -> None:
        self.written = [False] * len(self.slots)
        self.in_flight = [False] * len(self.slots)


@dataclass(frozen=True)
class SavePlan:
    """What one save writes: ``writes[j] = (index in the call, entry)``; the rest are skipped."""

    writes: tuple[tuple[int, Entry], ...]
    skipped: tuple[int, ...]
    stored_rank: int

    def offsets(self) -> list[int]:
        return [entry.slots[self.stored_rank] for _, entry in self.writes]


@dataclass(frozen=True)
class LoadPlan:
    """What one load reads: ``reads[j] = (index in the call, entry)``, pinned until released."""

    reads: tuple[tuple[int, Entry], ...]
    missing: tuple[int, ...]
    stored_rank: int

    def offsets(self) -> list[int]:
        return [entry.slots[self.stored_rank] for _, entry in self.reads]


class BlockIndex:
    """The pool's table of contents; owns the slot allocator."""

    def __init__(self, capacity: int, write_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.allocator = SlotAllocator(capacity)
        self.write_timeout_s = write_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Key, Entry] = {}
        # The same entries by namespace, then hash: the query loop looks up raw hashes without
        # building a key tuple per hash. Changed only through _put and _pop.
        self._by_namespace: dict[str, dict[bytes, Entry]] = {}
        self._ready: OrderedDict[Key, Entry] = OrderedDict()  # READY and unpinned, LRU first
        self._writing: OrderedDict[Key, Entry] = OrderedDict()  # by creation time
        self._pinned = 0  # entries with pins > 0
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "write_timeouts": 0, "no_room": 0, "dropped": 0}

    # -- queries ------------------------------------------------------------------------

    def query(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """Length of the longest prefix of READY entries; refreshes their LRU places."""
        with self._lock:
            if self._writing:
                self._reclaim_expired()
            table = self._by_namespace.get(namespace, {})
            refresh = self._ready.move_to_end
            n = 0
            for h in hashes:
                entry = table.get(h)
                if entry is None or entry.state is not READY:
                    break
                if not entry.pins:
                    refresh(entry.key)
                n += 1
            self.counters["hits"] += n
            self.counters["misses"] += len(hashes) - n
            return n

    def state_of(self, namespace: str, h: bytes) -> str | None:
        """READY, WRITING or None (for tests and diagnostics)."""
        with self._lock:
            entry = self._entries.get((namespace, h))
            return None if entry is None else entry.state

    def lru_keys(self) -> list[Key]:
        """Evictable keys, least recently used first (for tests)."""
        with self._lock:
            return list(self._ready)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counters,
                "entries": len(self._entries),
                "entries_ready": len(self._entries) - len(self._writing),
                "entries_writing": len(self._writing),
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
        with self._lock:
            self._reclaim_expired()
            writes: list[tuple[int, Entry]] = []
            skipped: list[int] = []
            fresh: list[tuple[int, bytes]] = []
            seen: set[bytes] = set()
            for i, h in enumerate(hashes):
                entry = self._entries.get((namespace, h))
                if h in seen:
                    skipped.append(i)
                elif entry is None:
                    fresh.append((i, h))
                elif entry.state == READY:
                    if entry.pins == 0:
                        self._ready.move_to_end(entry.key)
                    skipped.append(i)
                elif entry.written[stored_rank] or entry.in_flight[stored_rank]:
                    skipped.append(i)
                else:
                    entry.in_flight[stored_rank] = True
                    writes.append((i, entry))
                seen.add(h)
            if fresh:
                created = self._create(namespace, fresh, stored_ranks, slot_bytes)
                for i, entry in created:
                    entry.in_flight[stored_rank] = True
                writes.extend(created)
                placed = {i for i, _ in created}
                no_room = [i for i, _ in fresh if i not in placed]
                self.counters["no_room"] += len(no_room)
                skipped.extend(no_room)
            writes.sort(key=lambda w: w[0])
            return SavePlan(tuple(writes), tuple(sorted(skipped)), stored_rank)

    def complete_save(self, plan: SavePlan, ok: bool) -> None:
        """The plan's copy has completed (``ok``) or failed: entries advance or are dropped."""
        with self._lock:
            r = plan.stored_rank
            for _, entry in plan.writes:
                entry.in_flight[r] = False
                if ok and not entry.dead:
                    entry.written[r] = True
                    if all(entry.written):
                        entry.state = READY
                        del self._writing[entry.key]
                        self._ready[entry.key] = entry
                elif not entry.dead:
                    # A failed copy leaves the slot's bytes unknown: drop the whole entry.
                    self._drop(entry)
                self._release_if_idle(entry)

    def drop_namespace(self, namespace: str) -> int:
        """Forget every block of ``namespace`` (vLLM's prefix-cache reset, e.g. after new weights).

        Nothing of it is a hit or loadable afterwards. Slots of copies still in flight are freed
        when those copies complete; a load that already started finishes from its stable copy.
        """
        with self._lock:
            entries = list(self._by_namespace.get(namespace, {}).values())
            for entry in entries:
                self._drop(entry)
                self._release_if_idle(entry)
            self.counters["dropped"] += len(entries)
            return len(entries)

    # -- loads --------------------------------------------------------------------------

    def prepare_load(self, namespace: str, hashes: Sequence[bytes], stored_rank: int) -> LoadPlan:
        """Pin the READY entries of ``hashes``; the others are ``missing``."""
        with self._lock:
            reads: list[tuple[int, Entry]] = []
            missing: list[int] = []
            for i, h in enumerate(hashes):
                entry = self._entries.get((namespace, h))
                if entry is None or entry.state != READY:
                    missing.append(i)
                    continue
                if entry.pins == 0:
                    del self._ready[entry.key]
                    self._pinned += 1
                entry.pins += 1
                reads.append((i, entry))
            return LoadPlan(tuple(reads), tuple(missing), stored_rank)

    def unpin(self, plan: LoadPlan) -> None:
        """Release a load's pins (once per plan: the caller keeps track)."""
        with self._lock:
            for _, entry in plan.reads:
                assert entry.pins > 0, "unpin of an entry that is not pinned"
                entry.pins -= 1
                if entry.pins == 0:
                    self._pinned -= 1
                if entry.pins == 0 and not entry.dead:
                    self._ready[entry.key] = entry  # most recently used
                self._release_if_idle(entry)

    def forget(self, plan: LoadPlan) -> None:
        """A failed load: its entries stop being advertised (vLLM must not loop on them)."""
        with self._lock:
            for _, entry in plan.reads:
                if not entry.dead:
                    self._drop(entry)
                self._release_if_idle(entry)

    # -- internals ----------------------------------------------------------------------

    def _create(
        self, namespace: str, fresh: list[tuple[int, bytes]], stored_ranks: int, slot_bytes: int
    ) -> list[tuple[int, Entry]]:
        """New WRITING entries for ``fresh``, all of them if room can be made, else a prefix."""
        offsets = self._reserve(len(fresh) * stored_ranks, slot_bytes)
        count = len(fresh)
        if offsets is None:
            # Not all fit: take blocks one at a time, in order (a prefix is what a later
            # query can hit), until the pool holds no more.
            offsets_per_block: list[list[int]] = []
            for _ in fresh:
                got = self._reserve(stored_ranks, slot_bytes)
                if got is None:
                    break
                offsets_per_block.append(got)
            count = len(offsets_per_block)
        else:
            # Rank-major: each rank's slots for this save are contiguous, so one rank's save
            # is one DMA per run.
            offsets_per_block = [[offsets[r * count + j] for r in range(stored_ranks)] for j in range(count)]
        now = self._clock()
        created = []
        for (i, h), slots in zip(fresh[:count], offsets_per_block):
            entry = Entry((namespace, h), slot_bytes, slots, now)
            self._put(entry)
            self._writing[entry.key] = entry
            created.append((i, entry))
        return created

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
            batch: list[Entry] = []
            while self._ready and shortfall > 0:
                _, victim = self._ready.popitem(last=False)
                self._pop(victim)
                batch.append(victim)
                shortfall -= victim.slot_bytes * len(victim.slots)
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
        return [run.offset + k * slot_bytes for run in runs for k in range(run.count)]

    def _restore(self, evicted: list[Entry]) -> None:
        """Undo an eviction that could not make room: the allocator and index are unchanged."""
        for offset, nbytes in _merged_runs(evicted):
            self.allocator.reserve(offset, nbytes)
        for entry in reversed(evicted):
            self._put(entry)
            self._ready[entry.key] = entry
            self._ready.move_to_end(entry.key, last=False)

    def _reclaim_expired(self) -> None:
        deadline = self._clock() - self.write_timeout_s
        while self._writing:
            key, entry = next(iter(self._writing.items()))
            if entry.created > deadline:
                break
            logger.warning("block %s of %s not written by every rank in %.1f s: reclaimed",
                           key[1].hex()[:16], key[0], self.write_timeout_s)
            self.counters["write_timeouts"] += 1
            self._drop(entry)
            self._release_if_idle(entry)

    def _drop(self, entry: Entry) -> None:
        """Remove from every table; the caller frees the slots when nothing is in flight."""
        entry.dead = True
        self._pop(entry)
        self._writing.pop(entry.key, None)
        self._ready.pop(entry.key, None)

    def _put(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        self._by_namespace.setdefault(entry.key[0], {})[entry.key[1]] = entry

    def _pop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        table = self._by_namespace[entry.key[0]]
        del table[entry.key[1]]
        if not table:
            del self._by_namespace[entry.key[0]]

    def _release_if_idle(self, entry: Entry) -> None:
        """Free a dead entry's slots once no copy writes or reads them."""
        if entry.dead and entry.slots and entry.pins == 0 and not any(entry.in_flight):
            for offset in entry.slots:
                self.allocator.free(offset, entry.slot_bytes)
            entry.slots = []


def _merged_runs(entries: list[Entry]) -> list[tuple[int, int]]:
    """The entries' slots as sorted (offset, nbytes) runs, adjacent slots merged."""
    spans = sorted((offset, entry.slot_bytes) for entry in entries for offset in entry.slots)
    runs: list[tuple[int, int]] = []
    for offset, nbytes in spans:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + nbytes)
        else:
            runs.append((offset, nbytes))
    return runs
