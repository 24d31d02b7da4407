"""Small int64 tables (page geometry, block ids) to the GPU through one pinned ring per device.

``Tensor.pin_memory()`` goes through torch's caching host allocator: on an H100 host a table
of a few KiB took 130-170 us to pin and 50-110 us more to copy (torch.profiler, bench/engine.py
Llama-3-70B TP8 saves, 2026-12-07), once per transfer piece and ahead of its first copy; on a
slower host a ring uploaded through torch's own calls (slice, view, ``copy_``) cost about as
much. Here a table is written into the next free slice of a pinned ring and uploaded from
there by one driver call on the current stream. Slices are reused in ring order, each once the upload that read it has
completed (its event); when the ring has no room (uploads stuck behind a busy stream) the
caller falls back to the old path, so the host never waits.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import torch

from pegaflow.kernels.driver import copy_async

RING_BYTES = 4 << 20
MAX_TABLE_BYTES = RING_BYTES // 8  # larger tables (tens of thousands of ids) take the old path
_ALIGN = 256


class _Ring:
    """One device's pinned ring: ``busy`` holds the slices whose uploads may still be reading,
    oldest first; the free space runs from ``head`` to the oldest busy slice's start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True)
        self.words = self.host.numpy().view(np.int64)
        self.address = self.host.data_ptr()
        self.head = 0
        self.busy: deque[tuple[int, torch.cuda.Event]] = deque()
        self.spare: list[torch.cuda.Event] = []
        self.lock = threading.Lock()

    def upload(self, table: np.ndarray) -> torch.Tensor | None:
        nbytes = table.nbytes
        size = -(-nbytes // _ALIGN) * _ALIGN
        with self.lock:
            start = self._claim(size)
            if start is None:
                return None
            first = start // 8
            self.words[first : first + table.size] = table
            stream = torch.cuda.current_stream(self.device)
            out = torch.empty(table.size, dtype=torch.int64, device=self.device)
            copy_async(out.data_ptr(), self.address + start, nbytes, stream.cuda_stream)
            event = self.spare.pop() if self.spare else torch.cuda.Event()
            event.record(stream)
            self.busy.append((start, event))
            self.head = start + size
            return out

    def _claim(self, size: int) -> int | None:
        """The start of ``size`` free bytes, or None. With slices in flight, head == tail means
        the head has wrapped round and caught up with the oldest: full."""
        busy = self.busy
        while busy and busy[0][1].query():
            self.spare.append(busy.popleft()[1])
        if not busy:
            self.head = 0
            return 0 if size <= RING_BYTES else None
        head, tail = self.head, busy[0][0]
        if head > tail:  # busy slices lie in [tail, head): free at the end, then before tail
            if head + size <= RING_BYTES:
                return head
            return 0 if size <= tail else None
        return head if head + size <= tail else None  # wrapped: free in [head, tail)


_rings: dict[int, _Ring] = {}
_rings_lock = threading.Lock()


def to_device(table: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """``table`` (int64, contiguous) on ``device``, enqueued on its current stream; None when
    it is too large or the ring is full (then upload it some other way)."""
    if table.dtype != np.int64 or not table.flags.c_contiguous or table.nbytes > MAX_TABLE_BYTES:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    ring = _rings.get(index)
    if ring is None:
        with _rings_lock:
            ring = _rings.get(index)
            if ring is None:
                ring = _rings[index] = _Ring(torch.device("cuda", index))
    return ring.upload(table)
