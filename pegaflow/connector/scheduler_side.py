"""The scheduler-side half of the connector: decides what to load and what to save.

It runs in vLLM's engine-core process and touches neither torch nor CUDA: it asks the server
how many of a request's block hashes it holds, and turns vLLM's scheduling decisions into
:class:`~pegaflow.connector.metadata.PegaConnectorMetadata` for the workers.

Block lifetime (invariant 2): every GPU block in a save job is pinned in vLLM's block pool
(``touch``) when the job is planned and released when every worker reported the job done, so
neither a finished nor a preempted request's blocks can be reused while a copy reads them.
That is why ``request_finished`` returns ``(False, None)``: pinning holds exactly the blocks
being copied, for exactly as long as needed, and covers preemption too (returning True would
hold every block of the request and still leave preempted requests unprotected). Loads only
target blocks of requests waiting in WAITING_FOR_REMOTE_KVS, which vLLM neither preempts nor
frees before the load is reported finished.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import EngineLink, LinkRejected, LinkUnavailable
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, PegaWorkerMetadata, SaveJob
from pegaflow.connector.tracker import RequestState, RequestTracker

logger = logging.getLogger(__name__)

NULL_BLOCK_ID = 0  # vLLM's null block: never holds data
# Hashes whose load failed are not advertised again (invariant 7); bounded so a long outage
# cannot grow it without limit (the oldest bans go first).
MAX_BANNED_HASHES = 1 << 16


class BlockPinner(Protocol):
    """Holds GPU blocks allocated while a copy reads them (vLLM's BlockPool via the facade)."""

    def pin(self, block_ids: Sequence[int]) -> None: ...

    def unpin(self, block_ids: Sequence[int]) -> None: ...


@dataclass
class _InflightSave:
    job: SaveJob
    reported: int = 0


class ConnectorScheduler:
    """Lookups, load planning, save planning and completion bookkeeping for one engine."""

    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        block_size: int,
        world_size: int,
        link: EngineLink,
        pinner: BlockPinner | None = None,
    ) -> None:
        if block_size <= 0 or world_size <= 0:
            raise ValueError(f"block_size and world_size must be > 0, got {block_size} and {world_size}")
        self.settings = settings
        self.block_size = block_size
        self.world_size = world_size
        self.link = link
        self.pinner = pinner
        self.trackers: dict[str, RequestTracker] = {}
        self._requests: dict[str, Any] = {}
        self._job_ids = itertools.count(1)
        self._planned_loads: list[LoadJob] = []
        self._inflight_loads: dict[str, LoadJob] = {}  # by request id
        self._inflight_saves: dict[int, _InflightSave] = {}
        self._final_saves: list[tuple[int, bytes]] = []  # (block id, hash) of finished requests
        self._banned: OrderedDict[bytes, None] = OrderedDict()
        self.counters: Counter[str] = Counter()

    # ---- requests -------------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        self._tracker(request)

    def _tracker(self, request: Any) -> RequestTracker:
        tracker = self.trackers.get(request.request_id)
        if tracker is None:
            tracker = RequestTracker(request.request_id, preemptions_seen=request.num_preemptions)
            self.trackers[request.request_id] = tracker
            self._requests[request.request_id] = request
        return tracker

    def _note_preemption(self, tracker: RequestTracker, request: Any) -> None:
        """A RUNNING request vLLM preempted goes back to WAITING (once per preemption)."""
        if request.num_preemptions > tracker.preemptions_seen:
            tracker.preemptions_seen = request.num_preemptions
            if tracker.state is RequestState.RUNNING:
                tracker.preempted()

    # ---- lookups ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens PegaFlow can add after the local hit: whole blocks, never the last prompt
        token; always loaded asynchronously. Asks the server; a dead server is a miss."""
        tracker = self._tracker(request)
        self._note_preemption(tracker, request)
        bs = self.block_size
        local = num_computed_tokens // bs
        limit = min(len(request.block_hashes), (request.num_tokens - 1) // bs)
        tracker.local_blocks, tracker.external_blocks = local, 0
        if limit <= local:
            return 0, False
        joined = _joined_hashes(tracker, request.block_hashes)
        self.counters["lookups"] += 1
        try:
            if joined is not None:
                size = joined
                blob = tracker.hash_blob[local * size : limit * size]
                held = int(self.link.call("query_blob", self.settings.instance_id, blob, size))
            else:  # hashes of mixed lengths: the client's checks name the problem
                hashes = [bytes(h) for h in request.block_hashes[local:limit]]
                held = int(self.link.call("query", self.settings.instance_id, hashes))
        except (LinkUnavailable, LinkRejected) as exc:
            self.counters["lookup_errors"] += 1
            logger.debug("lookup for %s is a miss: %s", request.request_id, exc)
            return 0, False
        held = max(0, min(held, limit - local))
        if self._banned:
            for i in range(held):
                if bytes(request.block_hashes[local + i]) in self._banned:
                    held = i
                    break
        tracker.external_blocks = held
        self.counters["lookup_hit_blocks"] += held
        return held * bs, held > 0

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Record the load targets (first call of an async hit) or start running (0 tokens:
        a plain admission, or the second call after the load finished)."""
        tracker = self._tracker(request)
        self._note_preemption(tracker, request)
        if num_external_tokens > 0:
            start, n = tracker.local_blocks, num_external_tokens // self.block_size
            ids = [int(b) for b in block_ids[start : start + n]]
            hashes = [bytes(h) for h in request.block_hashes[start : start + n]]
            if num_external_tokens % self.block_size or len(ids) != n or len(hashes) != n:
                # Cannot happen with vLLM 0.33's scheduler; if it does, the load is sent empty
                # so that every worker fails it and vLLM recomputes (it never waits forever).
                logger.error(
                    "request %s: %d external tokens do not map to %d whole blocks after block %d "
                    "(table has %d); failing the load",
                    request.request_id,
                    num_external_tokens,
                    n,
                    start,
                    len(block_ids),
                )
                ids, hashes = [], []
            job = LoadJob(next(self._job_ids), request.request_id, tuple(ids), tuple(hashes))
            tracker.plan_load(job.job_id, ids, hashes)
            self._planned_loads.append(job)
        else:
            tracker.start_running()

    # ---- per step --------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> PegaConnectorMetadata:
        """This step's loads and one save job: the blocks that are full and computed once this
        step's forward has run (prompt and, per ``save_scope``, decode blocks)."""
        preempted = frozenset(scheduler_output.preempted_req_ids or ())
        for req_id in preempted:
            tracker = self.trackers.get(req_id)
            if tracker is not None:
                self._note_preemption(tracker, self._requests[req_id])

        loads, self._planned_loads = self._planned_loads, []
        for job in loads:
            tracker = self.trackers.get(job.req_id)
            if tracker is not None and tracker.state is RequestState.LOAD_PLANNED:
                tracker.load_sent()
            self._inflight_loads[job.req_id] = job
            self.counters["loads"] += 1
            self.counters["load_blocks"] += len(job.hashes)

        final_pairs, self._final_saves = self._final_saves, []  # pinned by request_finished
        pairs: list[tuple[int, bytes]] = []
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            tracker = self.trackers.get(req_id)
            if tracker is None or tracker.state is not RequestState.RUNNING:
                continue
            request = self._requests[req_id]
            if tracker.cursor_pending:
                # Blocks computed before this request ran (local or PegaFlow hits) are not
                # saved again: they are in the pool or came from a request that saved them.
                tracker.saved_blocks = max(tracker.saved_blocks, request.num_computed_tokens // self.block_size)
                tracker.cursor_pending = False
            end = self._savable_end(request, request.num_computed_tokens + num_new)
            if end <= tracker.saved_blocks:
                continue
            table = self._block_table(req_id, block_state)
            pairs.extend(self._pairs(request, table, tracker.saved_blocks, end))
            tracker.saved_blocks = end

        pairs = _unique_hashes(pairs, {h for _, h in final_pairs})
        save = None
        if (pairs or final_pairs) and self.link.available():
            self._pin([b for b, _ in pairs])
            ids, hashes = zip(*(final_pairs + pairs))
            save = SaveJob(next(self._job_ids), tuple(ids), tuple(hashes))
            self._inflight_saves[save.job_id] = _InflightSave(save)
            self.counters["save_jobs"] += 1
            self.counters["save_blocks"] += len(ids)
        elif pairs or final_pairs:
            # The server is down (as far as lookups know): these blocks are simply not cached.
            self._unpin([b for b, _ in final_pairs])
            self.counters["save_blocks_dropped"] += len(pairs) + len(final_pairs)
        return PegaConnectorMetadata(loads=loads, save=save, preempted_req_ids=preempted)

    def _savable_end(self, request: Any, computed_tokens: int) -> int:
        end = min(len(request.block_hashes), computed_tokens // self.block_size)
        if not self.settings.save_decode_blocks:
            end = min(end, request.num_prompt_tokens // self.block_size)
        return end

    def _block_table(self, req_id: str, block_state: Any) -> list[int]:
        groups = block_state.get_block_ids(req_id) if block_state is not None else None
        if groups is None:
            raise ValueError(f"request {req_id} was scheduled but vLLM gave no block table for it")
        return list(groups[0])

    @staticmethod
    def _pairs(request: Any, table: Sequence[int], start: int, end: int) -> list[tuple[int, bytes]]:
        end = min(end, len(table))
        return [
            (int(table[i]), bytes(request.block_hashes[i])) for i in range(start, end) if table[i] != NULL_BLOCK_ID
        ]

    def update_connector_output(
        self,
        finished_recving: set[str] | None,
        failed_recving: set[str] | None,
        worker_meta: PegaWorkerMetadata | None,
    ) -> None:
        """Loads finished on every worker (failed ones stop being advertised) and save jobs
        every worker finished (their blocks are released)."""
        failed = failed_recving or set()
        for req_id in finished_recving or ():
            job = self._inflight_loads.pop(req_id, None)
            tracker = self.trackers.get(req_id)
            if req_id in failed:
                self.counters["loads_failed"] += 1
                if job is not None:
                    self._ban(job.hashes)
                if tracker is not None and tracker.state is RequestState.LOADING:
                    tracker.load_failed()
            elif tracker is not None and tracker.state is RequestState.LOADING:
                tracker.load_done()
        if worker_meta is None:
            return
        self.counters["save_blocks_done"] += worker_meta.blocks_saved
        self.counters["save_blocks_skipped"] += worker_meta.blocks_skipped
        self.counters["saves_failed"] += worker_meta.saves_failed
        for job_id, count in worker_meta.saves_done.items():
            inflight = self._inflight_saves.get(job_id)
            if inflight is None:
                logger.warning("save job %s reported done but not in flight; ignored", job_id)
                continue
            inflight.reported += count
            if inflight.reported >= self.world_size:
                del self._inflight_saves[job_id]
                self._unpin(inflight.job.block_ids)

    def request_finished(self, request: Any, block_ids: Sequence[int]) -> tuple[bool, None]:
        """Queue the request's last full blocks not yet saved (pinned now, before vLLM frees
        them); the blocks being copied stay pinned, so vLLM may free the rest at once."""
        tracker = self.trackers.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        if tracker is None:
            return False, None
        if tracker.state is RequestState.RUNNING and not tracker.cursor_pending:
            # Only tokens whose step output was processed are sure to have their KV written.
            written = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
            end = self._savable_end(request, written)
            if end > tracker.saved_blocks:
                pairs = self._pairs(request, block_ids, tracker.saved_blocks, end)
                self._pin([b for b, _ in pairs])
                self._final_saves.extend(pairs)
        tracker.finish()
        return False, None

    # ---- state -----------------------------------------------------------------------------

    def has_pending_saves(self) -> bool:
        return bool(self._inflight_saves or self._final_saves)

    def pinned_block_count(self) -> int:
        return sum(len(s.job.block_ids) for s in self._inflight_saves.values()) + len(self._final_saves)

    def take_counters(self) -> dict[str, int]:
        """Counters since the last call (vLLM sums them per logging interval)."""
        counters = {k: v for k, v in self.counters.items() if v}
        self.counters.clear()
        counters["pinned_blocks"] = self.pinned_block_count()
        return counters

    def reset(self) -> bool:
        """vLLM's prefix-cache reset (new weights): drop the namespace's blocks on the server and
        forget the failed-load bans. False when the server could not drop them."""
        self._banned.clear()
        try:
            dropped = self.link.call("reset", self.settings.instance_id)
        except (LinkUnavailable, LinkRejected) as exc:
            logger.warning("PegaFlow cache not reset (%s): its blocks may be served again", exc)
            return False
        logger.info("PegaFlow cache reset: %s blocks dropped", dropped)
        return True

    def is_banned(self, block_hash: bytes) -> bool:
        return bytes(block_hash) in self._banned

    def _ban(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            self._banned[bytes(h)] = None
            self._banned.move_to_end(bytes(h))
        while len(self._banned) > MAX_BANNED_HASHES:
            self._banned.popitem(last=False)
        self.counters["banned_hashes"] += len(hashes)

    def _pin(self, block_ids: Sequence[int]) -> None:
        if self.pinner is not None and block_ids:
            self.pinner.pin(block_ids)

    def _unpin(self, block_ids: Sequence[int]) -> None:
        if self.pinner is not None and block_ids:
            self.pinner.unpin(block_ids)


def _unique_hashes(pairs: list[tuple[int, bytes]], taken: set[bytes]) -> list[tuple[int, bytes]]:
    """Drop pairs whose hash is already in the job (two requests computing one prefix)."""
    out = []
    for block_id, h in pairs:
        if h not in taken:
            taken.add(h)
            out.append((block_id, h))
    return out


def _joined_hashes(tracker: RequestTracker, hashes: Sequence[bytes]) -> int | None:
    """Bring ``tracker.hash_blob`` up to date with the request's block hashes (vLLM appends
    them as blocks fill) and return their length; None if they are not all one length.

    Joined once per new hash, not once per lookup: the scheduler asks about each waiting
    request every step, and gathering 1,000 hashes costs ~15 us joined, ~50 us one by one.
    """
    n = tracker.hashes_joined
    if not hashes:
        return None
    size = len(hashes[0])
    if n > len(hashes) or (n and tracker.hash_blob[(n - 1) * size :] != hashes[n - 1]):
        # Not the list the blob was joined from: start again. The last hash is enough to
        # tell, as vLLM chains them (a different earlier hash changes every later one).
        n = 0
        tracker.hash_blob = b""
    if len(hashes) > n:
        tracker.hash_blob += b"".join(hashes[n:])
        tracker.hashes_joined = n = len(hashes)
    if len(tracker.hash_blob) != n * size:
        return None
    return size
