"""Slots inside one byte region: variable slot sizes, contiguous runs preferred.

Free space is a set of extents kept twice: by start (to coalesce neighbours on free) and by
(length, start) (to find the smallest extent that fits). Both are sorted containers, so
allocate and free are O(log n) in the number of extents, plus the number of runs returned.
"""

from __future__ import annotations

from dataclasses import dataclass

from sortedcontainers import SortedDict, SortedList


@dataclass(frozen=True)
class Run:
    """``count`` slots of ``slot_bytes`` back to back from byte ``offset``."""

    offset: int
    count: int


class SlotAllocator:
    """Hands out slots of any size from ``[0, capacity)``; not thread-safe (the index locks)."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._by_start: SortedDict = SortedDict()  # start -> length
        self._by_size: SortedList = SortedList()  # (length, start)
        self._free_bytes = 0
        if capacity:
            self._insert(0, capacity)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def used_bytes(self) -> int:
        return self.capacity - self._free_bytes

    def free_extents(self) -> list[tuple[int, int]]:
        """(start, length) of every free extent, by start (for tests and stats)."""
        return list(self._by_start.items())

    def can_allocate(self, count: int, slot_bytes: int) -> bool:
        """Whether ``allocate(count, slot_bytes)`` would succeed now."""
        return self._slots_available(count, slot_bytes) >= count

    def allocate(self, count: int, slot_bytes: int) -> list[Run] | None:
        """``count`` slots of ``slot_bytes`` as runs, or None (and no change) if they do not fit.

        One run when some free extent holds them all (the smallest such extent, to keep large
        ones whole); otherwise the largest extents first, so a transfer splits into few runs.
        It succeeds whenever the free extents hold ``count`` whole slots between them.
        """
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if not isinstance(slot_bytes, int) or slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be a positive int, got {slot_bytes!r}")
        if count == 0:
            return []
        need = count * slot_bytes
        i = self._by_size.bisect_left((need, -1))
        if i < len(self._by_size):
            length, start = self._by_size[i]
            self._take(start, length, need)
            return [Run(start, count)]
        if self._slots_available(count, slot_bytes) < count:
            return None
        runs: list[Run] = []
        left = count
        while left:
            length, start = self._by_size[-1]
            n = min(left, length // slot_bytes)
            assert n > 0, "counted slots vanished"
            self._take(start, length, n * slot_bytes)
            runs.append(Run(start, n))
            left -= n
        return runs

    def free(self, offset: int, nbytes: int) -> None:
        """Return ``[offset, offset + nbytes)``, merging it with free neighbours."""
        if nbytes <= 0:
            return
        end = offset + nbytes
        if offset < 0 or end > self.capacity:
            raise ValueError(f"free of [{offset}, {end}) is outside [0, {self.capacity})")
        keys = self._by_start.keys()
        i = self._by_start.bisect_right(offset)  # extents starting at or before offset
        prev_start = keys[i - 1] if i else None
        next_start = keys[i] if i < len(keys) else None
        if prev_start is not None and prev_start + self._by_start[prev_start] > offset:
            raise ValueError(f"double free: [{offset}, {end}) overlaps the free extent at {prev_start}")
        if next_start is not None and next_start < end:
            raise ValueError(f"double free: [{offset}, {end}) overlaps the free extent at {next_start}")
        if prev_start is not None and prev_start + self._by_start[prev_start] == offset:
            offset = prev_start
            self._remove(prev_start)
        if next_start == end:
            end += self._remove(next_start)
        self._insert(offset, end - offset)

    def reserve(self, offset: int, nbytes: int) -> None:
        """Take the specific free range ``[offset, offset + nbytes)`` (to undo a free)."""
        i = self._by_start.bisect_right(offset)
        if not i:
            raise ValueError(f"reserve of [{offset}, {offset + nbytes}): not free")
        start = self._by_start.keys()[i - 1]
        length = self._by_start[start]
        if offset + nbytes > start + length:
            raise ValueError(f"reserve of [{offset}, {offset + nbytes}): not free")
        self._remove(start)
        if offset > start:
            self._insert(start, offset - start)
        if start + length > offset + nbytes:
            self._insert(offset + nbytes, start + length - offset - nbytes)

    # -- internals --------------------------------------------------------------------------

    def _slots_available(self, count: int, slot_bytes: int) -> int:
        """Whole slots in the free extents, counting from the largest down and stopping at ``count``."""
        total = 0
        for length, _ in reversed(self._by_size):
            n = length // slot_bytes
            if n == 0:
                break
            total += n
            if total >= count:
                break
        return total

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_size.add((length, start))
        self._free_bytes += length

    def _remove(self, start: int) -> int:
        length = self._by_start.pop(start)
        self._by_size.remove((length, start))
        self._free_bytes -= length
        return length

    def _take(self, start: int, length: int, nbytes: int) -> None:
        """Allocate the first ``nbytes`` of the free extent at ``start``."""
        self._remove(start)
        if nbytes < length:
            self._insert(start + nbytes, length - nbytes)
