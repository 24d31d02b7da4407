"""bench/burst_gaps.py's arithmetic on the CPU (the bench itself needs a GPU)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from burst_gaps import copy_gaps  # noqa: E402


def test_idle_counts_only_time_when_no_copy_runs():
    # Two streams: [0, 10] and [5, 12] overlap, then nothing until 20, [20, 25], [30, 31].
    spans = [(30.0, 31.0), (5.0, 12.0), (0.0, 10.0), (20.0, 25.0)]
    assert copy_gaps(spans) == (0.0, 8.0 + 5.0, 31.0)


def test_idle_matches_a_sweep_over_unit_steps():
    rng = random.Random()
    for _ in range(200):
        spans = [(a, a + rng.randint(1, 6)) for a in (rng.randint(0, 60) for _ in range(rng.randint(1, 8)))]
        busy = {t for a, b in spans for t in range(a, b)}
        first, idle, last = copy_gaps([(float(a), float(b)) for a, b in spans])
        assert first == min(a for a, _ in spans) and last == max(b for _, b in spans)
        assert idle == sum(1 for t in range(int(first), int(last)) if t not in busy)


def test_no_copies_is_an_error():
    with pytest.raises(ValueError):
        copy_gaps([])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_bench_says_it_needs_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "burst_gaps.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and "needs a CUDA device" in run.stderr


def test_one_burst_reads_the_wrapped_lane(monkeypatch):
    """The wrappers and one_burst's columns, on a fake lane whose fake events stamp a fake clock
    (milliseconds): submits enqueue two 1 MB copies each, the first at 0.5 ms after the origin."""
    import types

    import burst_gaps
    import torch

    clock = {"ms": 0.0}

    class Event:
        def __init__(self, **_):
            self.ms = None

        def record(self, stream=None):
            self.ms = clock["ms"]

        def elapsed_time(self, other):
            return other.ms - self.ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    stream = types.SimpleNamespace(cuda_stream=7)

    class Lane:
        _paths = {"save": types.SimpleNamespace(dma=stream)}

        def _dma(self, dst, src, nbytes, handle):
            assert handle == 7
            clock["ms"] += 1.0  # each copy runs 1 ms

        def submit(self, job):
            clock["ms"] += 0.5  # idle before each job's copies
            self._dma(0, 0, 1_000_000, 7)
            self._dma(0, 0, 1_000_000, 7)
            job.done = True

    lane = Lane()
    dma_clock = burst_gaps.DmaClock(lane)
    ok = types.SimpleNamespace(ok=True, skipped=())

    def transfer():
        job = types.SimpleNamespace()
        lane.submit(job)
        return types.SimpleNamespace(wait=lambda timeout: ok)

    case = types.SimpleNamespace(name="fake", nbytes=2_000_000, keep_held=lambda: None)
    out = burst_gaps.one_burst(case, lambda: transfer, 3, dma_clock)
    assert len(dma_clock.marks) == 6 and len(dma_clock.submits) == 3
    assert out["first_copy_us"] == 500.0  # 0.5 ms of fake clock
    assert out["idle_us"] == 1000.0  # two more 0.5 ms gaps before the second and third jobs
    # 6 MB from the first copy's start (0.5 ms) to the last one's end (7.5 ms): 7 ms.
    assert out["copies_gbps"] == pytest.approx(6_000_000 / 7e-3 / 1e9)
    assert out["copies"] == 6 and out["first_launch_us"] >= 0 and out["first_submit_us"] >= 0
