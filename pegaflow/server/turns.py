"""Transfers the loop has started and not yet fully launched: one piece per turn.

A 1 GiB save is several milliseconds of the host's bookkeeping (the index, block tables,
launches). Started whole, it kept the loop from the requests behind it: end to end on the
H200, loads that arrived just after saves started ~10 ms after them, and saves and loads at
once reached 0.78-0.80 of the two-direction ceiling while each direction ran at 0.9 of its
half. Here each transfer's first piece starts as soon as it is accepted; its other pieces
start one per turn of the loop, between requests, with loads and saves taking turns, so
that both directions' copies start within about one piece's bookkeeping.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from pegaflow.engine.stepped import Transfer

logger = logging.getLogger(__name__)

_SAVE, _LOAD = "save", "load"


class Turns:
    """The transfers in progress, by direction, oldest first."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque] = {_SAVE: collections.deque(), _LOAD: collections.deque()}
        self._last = _SAVE  # the direction of the last turn

    def __bool__(self) -> bool:
        return bool(self._queues[_SAVE] or self._queues[_LOAD])

    def __len__(self) -> int:
        return len(self._queues[_SAVE]) + len(self._queues[_LOAD])

    def start(self, transfer: Transfer, registration: Any, on_started: Callable[[Transfer], None]) -> None:
        """Start ``transfer``'s first piece now; queue the rest. ``on_started(transfer)`` runs
        once every piece has started (or the rest was cancelled): ``transfer.handle`` is set.
        A ``registration`` (the server's) that is ``closing`` cancels the pieces not started;
        None: nothing cancels them (in-process callers such as bench/engine.py)."""
        if self._advance(transfer, registration):
            self._queues[transfer.direction].append((transfer, registration, on_started))
        else:
            on_started(transfer)

    def step(self) -> None:
        """Start one piece: of the oldest transfer of the direction whose turn it is."""
        other = _LOAD if self._last == _SAVE else _SAVE
        direction = other if self._queues[other] else self._last
        queue = self._queues[direction]
        if not queue:
            return
        self._last = direction
        transfer, registration, on_started = queue[0]
        if not self._advance(transfer, registration):
            queue.popleft()
            on_started(transfer)

    def cancel_all(self, reason: str) -> None:
        """Start nothing more: every queued transfer's remaining blocks fail with ``reason``."""
        for queue in self._queues.values():
            while queue:
                transfer, _, on_started = queue.popleft()
                transfer.cancel(reason)
                on_started(transfer)

    @staticmethod
    def _advance(transfer: Transfer, registration: Any) -> bool:
        """Start the transfer's next piece; whether pieces remain."""
        if registration is not None and registration.closing:
            transfer.cancel(f"rank {registration.rank} of {registration.instance_id!r} was released before the "
                            "transfer was fully started")
            return False
        try:
            return transfer.step()
        except Exception:  # the checks before acceptance make this a bug: the rest fails, keep serving
            logger.exception("a %s piece failed to start; the rest of the transfer fails", transfer.direction)
            return False
