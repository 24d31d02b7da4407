"""The completion board: a small shared-memory page where the server marks transfers done.

A completion pushed over ZMQ reaches a waiting worker after three thread wake-ups (the
server's completer hands it to the server's loop, the loop's ZMQ I/O thread sends it, the
client's I/O thread receives it), ~50-70 us each after idle on the H100 hosts
(bench/wake_latency.py, bench/NOTES.md session 14). Here the thread that saw the copy end
writes one word into a page the client has mapped, and a client that polls sees it at once.

The board is only an early notice: the server still pushes every completion, and the client
drops the pushed copy of a completion it has already reported. So a notice that is late,
lost or never written (a full board, a result with skipped or missing blocks, a server that
could not map the page) costs latency, never a completion.

Layout: ``SLOTS + 1`` little-endian uint64 words. Word 0 counts the notices written (the
client rescans only when it changed); word ``1 + tag % SLOTS`` holds the ``tag`` of the last
transfer noticed there. A tag is the client's number for one transfer, from 1 up, below
2**63; a slot is reused only once the client has seen its previous tag. One aligned 8-byte
store is atomic on x86-64 and AArch64, so a reader sees a whole tag or the previous one.

The client creates the file (in /dev/shm), the server maps it by name when the client says
hello, and the client unlinks it as soon as the server has answered: nothing is left behind.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import tempfile
import threading

import numpy as np

SLOTS = 4096
BOARD_BYTES = (SLOTS + 1) * 8
_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_NAME = re.compile(r"^pegaflow-board-[A-Za-z0-9_]{1,64}$")


def slot_of(tag: int) -> int:
    return 1 + tag % SLOTS


class ClientBoard:
    """The client's side: makes the page, then reads it."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="pegaflow-board-", dir=_DIR)
        try:
            os.ftruncate(fd, BOARD_BYTES)
            self._map = mmap.mmap(fd, BOARD_BYTES)
        finally:
            os.close(fd)
        self.words = np.frombuffer(self._map, dtype="<u8")

    def unlink(self) -> None:
        """Remove the name (the server has mapped it, or will never): the page lives on in the maps."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ServerBoard:
    """The server's side: one client's page, mapped by name; notices are written from engine threads."""

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(path)
        if os.path.realpath(directory) != os.path.realpath(_DIR) or not _NAME.match(name):
            raise ValueError(f"a completion board must be a pegaflow-board-* file in {_DIR}, not {path!r}")
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != BOARD_BYTES:
                raise ValueError(f"{path} is not a completion board ({info.st_size} bytes, want {BOARD_BYTES})")
            self._map = mmap.mmap(fd, BOARD_BYTES)
        finally:
            os.close(fd)
        self.path = path
        self._words = np.frombuffer(self._map, dtype="<u8")
        self._lock = threading.Lock()  # the save and load completers of every device write here

    def notice(self, tag: int) -> None:
        """Mark transfer ``tag`` done: its slot first, then the count the client watches."""
        words = self._words
        with self._lock:
            words[slot_of(tag)] = tag
            words[0] += 1
