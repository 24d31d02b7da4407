"""The block-id table uploader's buffer reuse, on the CPU: the stream and its events are
stand-ins whose completion the test decides, the copy a memmove. On the GPU the uploader runs
under every staged transfer (tests/test_engine_gpu.py) and beside a held stream
(tests/test_kernels_gpu.py)."""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest
import torch

from pegaflow.engine import tables
from pegaflow.engine.tables import TableUploader


class Event:
    """Done once the test says so; a new record makes it pending again."""

    def __init__(self, *args, **kwargs) -> None:
        self.done = True

    def record(self, stream=None) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class Stream:
    cuda_stream = 7


@pytest.fixture
def uploader(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(tables, "_pinned", lambda n: torch.empty(n, dtype=torch.int64))
    monkeypatch.setattr(tables, "INITIAL_ENTRIES", 8)
    copies = []

    def copy(dst, src, nbytes, stream):
        copies.append(stream)
        ctypes.memmove(dst, src, nbytes)

    up = TableUploader(torch.device("cpu"), Stream(), copy=copy, buffers=2)
    up.copies = copies
    return up


def fresh(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 40, n, dtype=np.int64)


def test_each_table_arrives_whole_in_one_reused_device_buffer(uploader):
    first = fresh(5, 1)
    a = uploader.upload(first)
    assert a is not None and torch.equal(a, torch.from_numpy(first))
    uploader._copied[0].done = True
    second = fresh(6, 2)
    b = uploader.upload(second)
    assert torch.equal(b, torch.from_numpy(second))
    assert a.data_ptr() == b.data_ptr()  # the same device buffer: stream order protects it
    assert uploader.copies == [Stream.cuda_stream] * 2


def test_a_host_buffer_is_not_rewritten_before_its_copy_completes(uploader):
    one, two = fresh(4, 3), fresh(4, 4)
    assert uploader.upload(one) is not None and uploader.upload(two) is not None
    # Both host buffers wait for their copies: the next table is left to the caller.
    assert uploader.upload(fresh(4, 5)) is None and uploader.fallbacks == 1
    assert np.array_equal(uploader._host[0][:4], one) and np.array_equal(uploader._host[1][:4], two)
    uploader._copied[0].done = True
    three = fresh(4, 6)
    assert torch.equal(uploader.upload(three), torch.from_numpy(three))
    assert np.array_equal(uploader._host[1][:4], two)


def test_a_table_longer_than_the_buffers_grows_them(uploader):
    small = uploader.upload(fresh(3, 7))
    uploader._copied[0].done = True
    big_table = fresh(50, 8)
    big = uploader.upload(big_table)
    assert torch.equal(big, torch.from_numpy(big_table))
    assert uploader._device_table.numel() >= 50 and small.numel() == 3
