"""One request's life as the scheduler-side connector sees it: an explicit state machine.

::

    WAITING ──alloc, hit──> LOAD_PLANNED ──meta built──> LOADING ──load done──> LOADED
       │  ^                                                 │                     │
       │  └──────────── load failed / preempted ───────────┘ (and RUNNING)        │
       └──alloc, no hit──> RUNNING <──────────────── second alloc (0 tokens) ─────┘
    any state but FINISHED ──request finished──> FINISHED

Only these transitions are legal; any other raises a ValueError naming the state, so a
call order vLLM changes under us fails loudly in tests instead of corrupting a cache.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestState(enum.Enum):
    WAITING = "waiting"  # admitted by vLLM yet (new, preempted, or after a failed load)
    LOAD_PLANNED = "load_planned"  # blocks allocated for a hit; load not yet sent
    LOADING = "loading"  # load sent to the workers
    LOADED = "loaded"  # every worker finished the load; vLLM will schedule it
    RUNNING = "running"  # computing; its full blocks get saved as they appear
    FINISHED = "finished"


# state -> {event: next state}: the only legal transitions.
_TRANSITIONS: dict[RequestState, dict[str, RequestState]] = {
    RequestState.WAITING: {
        "plan_load": RequestState.LOAD_PLANNED,
        "start_running": RequestState.RUNNING,
        "finish": RequestState.FINISHED,
    },
    RequestState.LOAD_PLANNED: {"load_sent": RequestState.LOADING, "finish": RequestState.FINISHED},
    RequestState.LOADING: {
        "load_done": RequestState.LOADED,
        "load_failed": RequestState.WAITING,
        "finish": RequestState.FINISHED,
    },
    RequestState.LOADED: {"start_running": RequestState.RUNNING, "finish": RequestState.FINISHED},
    RequestState.RUNNING: {"preempted": RequestState.WAITING, "finish": RequestState.FINISHED},
    RequestState.FINISHED: {},
}


@dataclass
class RequestTracker:
    """Where one request is, what it loads, and how far its saves got.

    ``saved_blocks`` is a cursor: blocks ``[0, saved_blocks)`` are in PegaFlow, in flight to
    it, or were already computed before this request ran (a local or external hit).
    """

    req_id: str
    state: RequestState = RequestState.WAITING
    # From the latest lookup: blocks hit locally (GPU) and blocks PegaFlow holds after them.
    local_blocks: int = 0
    external_blocks: int = 0
    load_job_id: int | None = None
    load_block_ids: list[int] = field(default_factory=list)
    load_hashes: list[bytes] = field(default_factory=list)
    saved_blocks: int = 0
    cursor_pending: bool = False  # set the save cursor from the first scheduled step
    preemptions_seen: int = 0
    # The request's block hashes joined back to back (how a query sends them), and how many
    # are in it: a waiting request is looked up every step, so they are joined once.
    hash_blob: bytes = b""
    hashes_joined: int = 0

    def _on(self, event: str) -> None:
        """Apply ``event``; a ValueError names the state if vLLM's call order breaks ours."""
        new = _TRANSITIONS[self.state].get(event)
        if new is None:
            raise ValueError(f"request {self.req_id}: {event} is illegal in state {self.state.name}")
        self.state = new

    # The named transitions, each one vLLM event.

    def plan_load(self, job_id: int, block_ids: list[int], hashes: list[bytes]) -> None:
        if len(block_ids) != len(hashes):
            raise ValueError(
                f"request {self.req_id}: a load needs as many block ids as hashes, "
                f"got {len(block_ids)} ids and {len(hashes)} hashes"
            )
        self._on("plan_load")
        self.load_job_id, self.load_block_ids, self.load_hashes = job_id, list(block_ids), list(hashes)

    def load_sent(self) -> None:
        self._on("load_sent")

    def load_done(self) -> None:
        self._on("load_done")

    def load_failed(self) -> None:
        self._on("load_failed")
        self._clear_load()

    def start_running(self) -> None:
        self._on("start_running")
        self._clear_load()
        self.cursor_pending = True

    def preempted(self) -> None:
        self._on("preempted")

    def finish(self) -> None:
        self._on("finish")

    def _clear_load(self) -> None:
        self.load_job_id, self.load_block_ids, self.load_hashes = None, [], []
