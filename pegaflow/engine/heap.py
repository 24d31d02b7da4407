"""The garbage collector, set as the server runs it once started.

A full collection scans every tracked object: with torch and numba imported that is ~270,000
objects and ~105 ms on the dev machine, a stall of every request in flight. What exists once
the server has started (modules, the pool, the engine's threads) lives as long as the
process, so it is frozen out of the scans; the index's entries (one per stored block) come
and go, and a full collection of 49,000 of them then took 5.6 ms. Benchmarks of the engine
in process call it too, so that they measure what the server does, not the collector.
"""

from __future__ import annotations

import gc

# Generation 0 after 50,000 new tracked objects (the default 700 collected every ~1.5
# 512-block saves), generation 1 after 20 of those, the oldest after 100.
THRESHOLDS = (50_000, 20, 100)


def settle() -> None:
    """Freeze what exists now out of the collector's scans; collect less often from now on."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
