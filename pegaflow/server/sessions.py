"""Who is connected and what they hold: sessions, KV cache registrations, jobs in flight.

A session is one client (its socket identity). It owns the KV cache registrations it made
and the jobs it started; when it ends (``bye``) or goes silent past the client timeout, its
registrations close as soon as their in-flight copies finish.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Completions kept for a session whose socket is away; beyond this the oldest are dropped
# (the client's socket was gone long enough that its jobs are lost to it anyway).
MAX_PENDING_PUSHES = 65_536
# Interprocess events opened per session: a worker keeps a small pool and reuses them.
MAX_EVENTS_PER_SESSION = 1024


@dataclass
class Registration:
    """One rank's KV cache as this server maps it."""

    instance_id: str
    rank: int
    session: bytes
    share: Any  # the sharing handle (pegaflow.sharing.CpuShare or CudaShare)
    storage: Any  # the opened torch.UntypedStorage: holding it keeps the mapping open
    num_blocks: int
    block_bytes: int
    device: int | None  # None: a CPU cache
    inflight: int = 0
    closing: bool = False
    client_dead: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.instance_id, self.rank)


@dataclass
class Job:
    session: bytes
    job_id: int
    kind: str
    registration: Registration
    started: float
    owner: Any = None  # the Session object: a later session of the same identity is not its owner


@dataclass
class Session:
    identity: bytes
    pid: int
    name: str
    last_seen: float
    registrations: set[tuple[str, int]] = field(default_factory=set)
    jobs: set[int] = field(default_factory=set)
    events: dict[bytes, Any] = field(default_factory=dict)
    pending: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_PUSHES))
    board: Any = None  # the client's completion board (pegaflow.board.ServerBoard), if it offered one

    def process_gone(self) -> bool:
        """True if the client's process is known to have exited (same host, by pid)."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
