"""The pinned ring that uploads kernel tables: a slice is never handed out while an upload
that reads it may still run (CPU: the claim logic with stand-in events; GPU: real uploads
held up behind a busy stream), and a full ring says so instead of waiting."""

from __future__ import annotations

import random
import threading
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow.kernels import upload

RING = 4096


class _Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def _cpu_ring(monkeypatch) -> upload._Ring:
    monkeypatch.setattr(upload, "RING_BYTES", RING)
    ring = object.__new__(upload._Ring)
    ring.head, ring.busy, ring.spare, ring.lock = 0, deque(), [], threading.Lock()
    return ring


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 1500), st.integers(0, 1000)), min_size=1, max_size=80))
def test_claims_never_overlap_a_busy_slice(steps):
    """Random claims of random sizes, and completions in any order (uploads on two streams
    finish out of ring order): every claimed slice lies inside the ring and overlaps no slice
    still busy; an empty ring always has room."""
    with pytest.MonkeyPatch.context() as mp:
        ring = _cpu_ring(mp)
        live: list[tuple[int, int, _Event]] = []
        for claim, size, pick in steps:
            if claim or not live:
                size = -(-size // 256) * 256
                start = ring._claim(size)
                if start is None:
                    assert any(not e.done for _, _, e in live), "refused with nothing in flight"
                    continue
                end = start + size
                assert 0 <= start and end <= RING
                for s, e, event in live:
                    if not event.done:
                        assert end <= s or e <= start, f"[{start}, {end}) overlaps busy [{s}, {e})"
                event = _Event()
                ring.busy.append((start, event))
                ring.head = end
                live.append((start, end, event))
            else:
                live[pick % len(live)][2].done = True


def test_full_ring_refuses_without_waiting(monkeypatch):
    ring = _cpu_ring(monkeypatch)
    held = _Event()
    assert ring._claim(2048) == 0
    ring.busy.append((0, held))
    ring.head = 2048
    assert ring._claim(1024) == 2048
    ring.busy.append((2048, _Event()))
    ring.head = 3072
    assert ring._claim(2048) is None  # 1024 left at the end, nothing before the oldest
    held.done = True
    assert ring._claim(1024) == 3072  # the end first
    assert ring._claim(2048) == 0  # wrapped: before the oldest busy slice (2048)


@pytest.mark.gpu
def test_uploads_behind_a_busy_stream_arrive_intact(monkeypatch):
    """Hundreds of tables uploaded while the stream sleeps, on two threads and streams, with a
    small ring: those the ring takes arrive bit-exact after the wait, none overwritten by a
    later table; when the ring fills, to_device returns None at once."""
    monkeypatch.setattr(upload, "RING_BYTES", 64 << 10)
    monkeypatch.setattr(upload, "MAX_TABLE_BYTES", 8 << 10)
    monkeypatch.setattr(upload, "_rings", {})
    device = torch.device("cuda", torch.cuda.current_device())
    results: list[list[tuple[np.ndarray, torch.Tensor | None]]] = [[], []]

    def run(k: int) -> None:
        rng = random.Random(k)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)  # the uploads queue behind ~0.1 s of sleep
            for _ in range(300):
                table = np.array([rng.getrandbits(63) for _ in range(rng.randint(1, 1000))], dtype=np.int64)
                results[k].append((table, upload.to_device(table, device)))
                if rng.random() < 0.1:
                    torch.cuda._sleep(2_000_000)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    taken = [(a, b) for per in results for a, b in per if b is not None]
    assert taken and len(taken) < 600  # some through the ring, some refused while it was full
    for table, uploaded in taken:
        assert torch.equal(uploaded.cpu(), torch.from_numpy(table))
    # Once everything is done, the ring has room again.
    assert upload.to_device(np.arange(100, dtype=np.int64), device) is not None
