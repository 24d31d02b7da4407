"""heap.settle: the server's collector settings (freeze what exists, rarer young collections)."""

from __future__ import annotations

import gc

from pegaflow.engine import heap


def test_settle_freezes_what_exists_and_sets_the_thresholds():
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        heap.settle()
        assert gc.get_freeze_count() > 1000  # at least the modules' objects
        assert gc.get_threshold() == heap.THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
