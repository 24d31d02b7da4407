"""Uploads of the kernels' block-id tables for one stream, without an allocation per upload.

A staged transfer's gathers (scatters) read their block ids from a small int64 table on the
GPU. Made per transfer piece with ``pin_memory()`` and ``.to()``, a table cost the H100's host
130-280 us before a save's first gather could start (a torch.profiler trace, bench/NOTES.md
session 14), on every piece of every transfer. Here each table is written into one of a few
pinned host buffers and copied by one ``cuMemcpyAsync`` into a device buffer that every table
of the stream reuses:

- The device buffer is safe to overwrite because the upload and every launch that reads the
  table run on the same stream: the next upload starts only after the last such launch.
- A host buffer is reused only once the copy out of it has completed (its event); if none is
  free (a long queue on the stream), :meth:`TableUploader.upload` returns None and the caller
  uploads the table the old way: nothing waits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pegaflow.engine import dma

# Host buffers per stream. A table waits in its host buffer until the stream reaches its
# upload, behind the jobs queued before it (up to INLINE_MAX_CHUNKS chunks, ~80 ms of copy);
# bursts of 1 GiB transfers queue a few pieces each, so a handful of buffers is rarely short.
HOST_BUFFERS = 16
# Initial capacity in int64 entries (a table holds 4 per KV region, then one per block).
INITIAL_ENTRIES = 4096


def _pinned(entries: int) -> torch.Tensor:
    return torch.empty(entries, dtype=torch.int64, pin_memory=True)


class TableUploader:
    """Uploads int64 tables onto ``stream`` (see the module docstring); one user at a time."""

    def __init__(self, device: torch.device, stream: Any, copy: Callable[[int, int, int, int], None] = dma.copy_async,
                 buffers: int = HOST_BUFFERS) -> None:
        self._device = device
        self._stream = stream
        self._copy = copy
        self._host: list[np.ndarray | None] = [None] * buffers  # views of pinned tensors (kept alive by them)
        self._copied: list[Any] = [None] * buffers  # event after the copy out of each host buffer
        self._next = 0
        self._device_table: torch.Tensor | None = None
        self.fallbacks = 0  # tables uploaded the old way: no host buffer was free

    def upload(self, table: np.ndarray) -> torch.Tensor | None:
        """``table`` (int64) on the device, readable by launches enqueued on the stream after
        this call; None if every host buffer still waits for its copy."""
        i = self._next
        copied = self._copied[i]
        if copied is not None and not copied.query():
            self.fallbacks += 1
            return None
        self._next = (i + 1) % len(self._host)
        n = int(table.size)
        host = self._host[i]
        if host is None or host.size < n:
            host = self._host[i] = _pinned(max(n, INITIAL_ENTRIES)).numpy()
            self._copied[i] = torch.cuda.Event()
        dev = self._device_table
        if dev is None or dev.numel() < n:
            # Allocated on the stream: the caching allocator hands the old buffer only to work
            # ordered after this stream's launches that may still read it.
            with torch.cuda.stream(self._stream):
                dev = torch.empty(max(n, INITIAL_ENTRIES, 2 * (0 if dev is None else dev.numel())),
                                  dtype=torch.int64, device=self._device)
            self._device_table = dev
        host[:n] = table
        self._copy(dev.data_ptr(), host.ctypes.data, n * 8, self._stream.cuda_stream)
        self._copied[i].record(self._stream)
        return dev[:n]
