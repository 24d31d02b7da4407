"""What a save or load returns: a handle to poll, wait on or be called back from."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferResult:
    """The outcome of one save or load.

    ``skipped`` (save): indices into the call's blocks that were not saved because the block
    was already held or the pool had no room; not an error. ``missing`` (load): indices whose
    hash was not held and ready; the load is then ``ok=False`` and nothing was loaded for them.
    """

    ok: bool
    num_blocks: int
    nbytes: int
    skipped: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    error: str | None = None


class TransferHandle:
    """Completion of one transfer: poll it, wait on it, or be called back.

    ``event`` (GPU mode) is recorded on the engine's stream after the copy: another stream can
    wait on it. It is ``None`` in CPU mode and for transfers that launched no copy. Copies may
    be enqueued by an engine thread, so reading ``event`` waits (briefly) until it is recorded:
    a wait on an event not yet recorded would wait for nothing.

    A handle costs one lock: the thread events behind ``wait`` and ``event`` are made only
    when some caller has to block on them (the server never does: it is called back).
    """

    def __init__(self, event: Any = None) -> None:
        self._event = event
        self._lock = threading.Lock()
        self._result: TransferResult | None = None
        self._callbacks: list[Callable[[TransferResult], None]] = []
        self._waiter: threading.Event | None = None  # made by the first wait() that must block
        self._launched = event is None  # the event has been recorded (or there is none)
        self._launch_waiter: threading.Event | None = None

    @property
    def event(self) -> Any:
        """The completion event; waits until the transfer has been enqueued (so it is recorded)."""
        if not self._launched:
            with self._lock:
                if not self._launched and self._launch_waiter is None:
                    self._launch_waiter = threading.Event()
                waiter = None if self._launched else self._launch_waiter
            if waiter is not None:
                waiter.wait()
        return self._event

    def _mark_launched(self) -> None:
        with self._lock:
            self._launched = True
            waiter = self._launch_waiter
        if waiter is not None:
            waiter.set()

    def done(self) -> bool:
        """True once the transfer has completed (or failed)."""
        return self._result is not None

    def wait(self, timeout: float | None = None) -> TransferResult:
        """The result, waiting up to ``timeout`` seconds; ``TimeoutError`` past it."""
        result = self._result
        if result is not None:
            return result
        with self._lock:
            if self._result is None and self._waiter is None:
                self._waiter = threading.Event()
            waiter = None if self._result is not None else self._waiter
        if waiter is not None and not waiter.wait(timeout):
            raise TimeoutError(f"transfer not done after {timeout} s")
        assert self._result is not None
        return self._result

    def add_done_callback(self, fn: Callable[[TransferResult], None]) -> None:
        """Call ``fn(result)`` once: from an engine thread, or at once if already done.

        ``fn`` runs on the thread that completes transfers: it must not block (in particular
        not wait on another handle); hand work to another thread instead.
        """
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                return
            result = self._result
        _call(fn, result)

    def _complete(self, result: TransferResult) -> None:
        """Engine side: set the result, wake waiters, run callbacks (once)."""
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            self._launched = True
            callbacks, self._callbacks = self._callbacks, []
            waiters = (self._waiter, self._launch_waiter)
        for waiter in waiters:
            if waiter is not None:
                waiter.set()
        for fn in callbacks:
            _call(fn, result)

    @classmethod
    def completed(cls, result: TransferResult, event: Any = None) -> TransferHandle:
        handle = cls(event)
        handle._complete(result)
        return handle


class _CombinedHandle(TransferHandle):
    """One transfer moved in pieces: done when every piece is; its event is the last
    launched piece's (pieces run in order on the same streams, so it completes last)."""

    def __init__(self, pieces: list[tuple[int, TransferHandle]], total: int) -> None:
        super().__init__(None)
        self._pieces = pieces
        self._total = total
        self._last = next((h for _, h in reversed(pieces) if h._event is not None), None)
        self._left = len(pieces)
        self._count_lock = threading.Lock()
        for _, piece in pieces:
            piece.add_done_callback(self._piece_done)

    @property
    def event(self) -> Any:
        return self._last.event if self._last is not None else None

    def _piece_done(self, _: TransferResult) -> None:
        with self._count_lock:
            self._left -= 1
            if self._left:
                return
        self._complete(merge_results([(start, h.wait(0)) for start, h in self._pieces], self._total))


def combine(pieces: list[tuple[int, TransferHandle]], total: int) -> TransferHandle:
    """One handle for a transfer split into pieces, ``(first index, handle)`` each, of ``total`` blocks."""
    return pieces[0][1] if len(pieces) == 1 else _CombinedHandle(pieces, total)


def missing_error(missing: int, total: int) -> str | None:
    """A load's error when ``missing`` of its ``total`` blocks were not held (None if none)."""
    return f"{missing} of {total} blocks not held" if missing else None


def merge_results(parts: list[tuple[int, TransferResult]], total: int) -> TransferResult:
    """The result of a transfer from its pieces' (indices shifted by each piece's first index).

    A piece's own error wins over the summary of missing blocks unless it is that piece's
    summary: a copy that failed is reported even where blocks were missing too.
    """
    skipped = tuple(start + i for start, r in parts for i in r.skipped)
    missing = tuple(start + i for start, r in parts for i in r.missing)
    ends = [start for start, _ in parts[1:]] + [total]
    errors = [r.error for (start, r), end in zip(parts, ends)
              if r.error and r.error != missing_error(len(r.missing), end - start)]
    error = errors[0] if errors else missing_error(len(missing), total)
    return TransferResult(all(r.ok for _, r in parts), sum(r.num_blocks for _, r in parts),
                          sum(r.nbytes for _, r in parts), skipped, missing, error)


def _call(fn: Callable[[TransferResult], None], result: TransferResult) -> None:
    # A failing callback belongs to its caller; it must not kill the engine's completion thread.
    try:
        fn(result)
    except Exception:
        logger.exception("transfer done-callback %r raised", fn)
