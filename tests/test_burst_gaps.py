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
