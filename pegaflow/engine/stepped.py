"""A save or load started piece by piece, so that one thread can interleave several.

``Engine.save`` and ``Engine.load`` book and launch every piece of a transfer before they
return: a 1 GiB save keeps its caller busy for milliseconds of bookkeeping, and whatever
arrives meanwhile (in the server: a load behind that save) waits. ``Engine.begin_save`` /
``begin_load`` return a :class:`Transfer` instead, whose :meth:`Transfer.step` books and
launches one piece. The server's loop takes turns between the transfers in progress and the
requests that arrive, on its own thread (a second thread for the later pieces waits for the
GIL while the first books: measured much worse on the H200, see bench/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable

from pegaflow.engine.handle import TransferHandle, TransferResult, combine


class Transfer:
    """The pieces of one transfer, started one :meth:`step` at a time.

    ``handle`` is None until every piece has been started (or the rest cancelled); then it
    is the transfer's one handle, exactly what ``Engine.save`` / ``load`` return.
    """

    def __init__(self, direction: str, count: int, plan: Callable[[], list[tuple[int, int]]],
                 start_piece: Callable[[int, int], TransferHandle], gone: Callable[[], str | None]) -> None:
        self.direction = direction
        self.count = count
        self._plan = plan  # (first, size) of each piece; asked at the first step (the path's state then)
        self._start_piece = start_piece
        self._gone = gone  # why the transfer can no longer start pieces (None while it can)
        self._parts: list[tuple[int, int]] | None = None
        self._next = 0
        self._handles: list[tuple[int, TransferHandle]] = []
        self.handle: TransferHandle | None = None

    @property
    def started_blocks(self) -> int:
        """Blocks of the pieces started so far."""
        return self._parts[self._next - 1][0] + self._parts[self._next - 1][1] if self._next else 0

    def step(self) -> bool:
        """Book and launch the next piece; True while pieces remain.

        A piece that raises cancels the rest (their blocks fail with the error, the pieces
        already started still complete) and the exception propagates; ``handle`` is then set.
        """
        if self.handle is not None:
            return False
        if self._parts is None:
            self._parts = self._plan()
        reason = self._gone()
        if reason is not None:
            self.cancel(reason)
            return False
        first, size = self._parts[self._next]
        try:
            piece = self._start_piece(first, size)
        except Exception as exc:
            self.cancel(f"{type(exc).__name__}: {exc}")
            raise
        self._handles.append((first, piece))
        self._next += 1
        if self._next == len(self._parts):
            self.handle = combine(self._handles, self.count)
            return False
        return True

    def run(self) -> TransferHandle:
        """Start every remaining piece; the transfer's handle."""
        while self.step():
            pass
        assert self.handle is not None
        return self.handle

    def cancel(self, reason: str) -> None:
        """Start no more pieces: the blocks not started fail with ``reason``; those started
        still complete, and the handle completes with them."""
        if self.handle is not None:
            return
        first = self.started_blocks
        failed = TransferResult(ok=False, num_blocks=0, nbytes=0, error=reason)
        if first < self.count or not self._handles:
            self._handles.append((first, TransferHandle.completed(failed)))
        self.handle = combine(self._handles, self.count)
