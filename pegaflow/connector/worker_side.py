"""The worker-side half of the connector: one per GPU rank, in vLLM's worker process.

It shares its KV cache with the server once (the server maps it: CUDA IPC on a GPU, shared
memory on the CPU) and afterwards only sends block ids, hashes and events. Loads start in
``start_load_kv``; saves in ``wait_for_save``, behind an interprocess CUDA event recorded on
the compute stream after the step's forward, so the server's copy waits on the GPU and this
process never waits on the host. Completions are collected without blocking once a step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import REGISTRATION_LOST, EngineLink, LinkRejected, LinkUnavailable, to_completion
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, PegaWorkerMetadata, SaveJob
from pegaflow.kernels import KVRegions

logger = logging.getLogger(__name__)

# Interprocess events in flight per worker: one per step with a save, released when the
# server completes that save. Beyond this many unanswered saves, new saves are skipped.
MAX_SAVE_EVENTS = 64


@dataclass(frozen=True)
class InstanceGeometry:
    """What the server needs to know about this instance (``pegaflow.engine.InstanceSpec``)."""

    instance_id: str
    model: str
    kv_dtype: str
    layout: str
    block_size: int
    tp_size: int
    replicated: bool
    hash_bytes: int = 32


def regions_from_kv_cache_config(kv_caches: dict[str, torch.Tensor], kv_cache_config: Any) -> KVRegions:
    """The regions of vLLM's KV cache, from the placements in ``kv_cache_config.kv_cache_tensors``.

    Aliases (KV-sharing and draft layers, cache groups overlaying one allocation) are
    dropped: a region is kept once per (address, stride, page). All regions must lie in one
    backing storage, as vLLM 0.33 allocates them.
    """
    from pegaflow.kernels.layouts import regions_from_kv_cache_tensor

    specs = _layer_specs(kv_cache_config)
    regions, seen, storage_ptr = [], set(), None
    num_blocks = None
    for placement in kv_cache_config.kv_cache_tensors:
        name = next((n for n in placement.layers if n in kv_caches), None)
        if name is None:
            continue
        spec = specs.get(name)
        if spec is None or not hasattr(spec, "page_size_bytes") or not getattr(spec, "has_layer_views", True):
            raise ValueError(f"layer {name!r} has no attention KV cache PegaFlow can address (spec {spec!r})")
        owner = kv_caches[name]
        if not isinstance(owner, torch.Tensor):
            raise ValueError(f"layer {name!r}: expected a tensor, got {type(owner).__name__}")
        ptr = owner.untyped_storage().data_ptr()
        if storage_ptr is not None and ptr != storage_ptr:
            raise ValueError("KV cache layers lie in more than one backing allocation; PegaFlow registers one")
        storage_ptr = ptr
        blocks = int(kv_cache_config.num_blocks_of(placement))
        kv = regions_from_kv_cache_tensor(
            owner,
            offset=int(placement.offset),
            layer_stride=int(placement.layer_stride),
            block_stride=int(placement.block_stride),
            page_bytes=int(spec.page_size_bytes),
            num_layers=len(placement.layers),
            num_blocks=blocks,
        )
        num_blocks = blocks if num_blocks is None else min(num_blocks, blocks)
        for region in kv.regions:
            key = (region.offset, region.block_stride, region.page_bytes)
            if key not in seen:
                seen.add(key)
                regions.append(region)
    if not regions or num_blocks is None:
        raise ValueError("no KV cache tensor of kv_cache_config is among the registered layers")
    return KVRegions(tuple(regions), num_blocks)


def _layer_specs(kv_cache_config: Any) -> dict[str, Any]:
    specs: dict[str, Any] = {}
    for group in kv_cache_config.kv_cache_groups:
        per_layer = getattr(group.kv_cache_spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
        for name in group.layer_names:
            specs[name] = per_layer[name] if per_layer else group.kv_cache_spec
    return specs


class EventPool:
    """Interprocess CUDA events, reused only after the server completed the save that used one
    (a re-record moves what a pending wait waits for).

    An event's IPC handle is fixed for its life: it is exported once (``handle``), not on
    every save, and the server keeps the event it opened under that handle.
    """

    def __init__(self, limit: int = MAX_SAVE_EVENTS) -> None:
        self._free: list[torch.cuda.Event] = []
        self._made = 0
        self._limit = limit
        self._handles: dict[int, tuple[torch.cuda.Event, bytes]] = {}  # id(event) -> (event, its handle)

    def acquire(self) -> torch.cuda.Event | None:
        if self._free:
            return self._free.pop()
        if self._made >= self._limit:
            return None
        self._made += 1
        return torch.cuda.Event(enable_timing=False, interprocess=True)

    def handle(self, event: torch.cuda.Event) -> bytes:
        """The event's IPC handle (the event must have been recorded once: it exists then)."""
        known = self._handles.get(id(event))
        if known is None:
            from pegaflow.sharing import share_event

            known = self._handles[id(event)] = (event, share_event(event))
        return known[1]

    def release(self, event: torch.cuda.Event) -> None:
        self._free.append(event)

    def discard(self, event: torch.cuda.Event) -> None:
        """An event the server may still wait on (its save was given up): never reuse it."""
        self._made -= 1
        self._handles.pop(id(event), None)


@dataclass
class _Pending:
    deadline: float
    req_id: str | None = None  # loads
    num_blocks: int = 0
    event: Any = None  # saves on CUDA


@dataclass
class _Results:
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)
    worker_meta: PegaWorkerMetadata = field(default_factory=PegaWorkerMetadata)


class ConnectorWorker:
    """One rank's transfers: registration, submission, completion and deadline bookkeeping.

    Every load job ends in ``finished_recving`` (and ``failed_recving`` if it failed) and every
    save job in the worker metadata exactly once, whatever the server does: that is what keeps
    vLLM from waiting forever and the scheduler side from pinning blocks forever.
    """

    def __init__(
        self,
        settings: ConnectorSettings,
        link: EngineLink,
        geometry: InstanceGeometry,
        *,
        rank: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= rank < geometry.tp_size:
            raise ValueError(f"rank must be in [0, {geometry.tp_size}), got {rank}")
        self.settings = settings
        self.link = link
        self.geometry = geometry
        self.rank = rank
        self._clock = clock
        self._regions: KVRegions | None = None
        self._registered = False
        self._register_after = 0.0  # no registration attempt before this (after a refusal)
        self._meta: PegaConnectorMetadata | None = None
        self._started: set[int] = set()  # load job ids submitted this step
        self._loads: dict[int, _Pending] = {}
        self._saves: dict[int, _Pending] = {}
        self._events = EventPool()
        self._out = _Results()

    @property
    def saves_here(self) -> bool:
        """MLA pages are identical on every rank: only rank 0 stores them."""
        return not self.geometry.replicated or self.rank == 0

    # ---- registration ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], kv_cache_config: Any) -> None:
        """Derive the regions and register them; a failure leaves the connector inert (every
        lookup a miss) rather than failing vLLM's start-up."""
        try:
            self._regions = regions_from_kv_cache_config(kv_caches, kv_cache_config)
        except ValueError:
            logger.exception("PegaFlow cannot address this KV cache; the connector stays inactive")
            return
        logger.info(
            "PegaFlow rank %d: %d region(s), %d blocks of %d bytes (%s)",
            self.rank,
            len(self._regions.regions),
            self._regions.num_blocks,
            self._regions.block_bytes,
            self.geometry.layout,
        )
        self._ensure_registered()

    def _ensure_registered(self) -> bool:
        if self._registered:
            return True
        if self._regions is None or not self.link.available() or self._clock() < self._register_after:
            return False
        g, kv = self.geometry, self._regions
        try:
            self.link.call(
                "register_instance",
                g.instance_id,
                model=g.model,
                kv_dtype=g.kv_dtype,
                layout=g.layout,
                block_size=g.block_size,
                page_bytes=[r.page_bytes for r in kv.regions],
                tp_size=g.tp_size,
                replicated=g.replicated,
                hash_bytes=g.hash_bytes,
            )
            self.link.call(
                "register_kv_caches",
                g.instance_id,
                self.rank,
                kv.regions[0].owner,
                [(r.offset, r.block_stride, r.page_bytes) for r in kv.regions],
                kv.num_blocks,
                device=kv.device,
            )
        except LinkUnavailable:
            return False
        except LinkRejected as exc:
            # already_registered means another client holds the rank (this rank's previous
            # process, until its session expires): taking it for success made every transfer
            # fail with not_registered and register again, step after step. Wait a back-off.
            log = logger.warning if exc.code == "already_registered" else logger.error
            log("PegaFlow refused rank %d's registration (retrying in %.1f s): %s", self.rank,
                self.settings.retry_initial_s, exc)
            self._register_after = self._clock() + self.settings.retry_initial_s
            return False
        self._registered = True
        return True

    # ---- per step ----------------------------------------------------------------------------

    def bind(self, meta: PegaConnectorMetadata) -> None:
        self._meta = meta

    def clear(self) -> None:
        self._meta = None
        self._started.clear()

    def handle_preemptions(self, meta: PegaConnectorMetadata) -> None:
        """Nothing to flush: the scheduler side pins every block a save reads until the save
        completes, and loads only target requests vLLM does not preempt."""
        if meta.preempted_req_ids:
            logger.debug("rank %d: %d request(s) preempted", self.rank, len(meta.preempted_req_ids))

    def start_load_kv(self) -> None:
        if self._meta is None:
            return
        for job in self._meta.loads:
            if job.job_id not in self._started:
                self._started.add(job.job_id)
                self._submit_load(job)

    def _submit_load(self, job: LoadJob) -> None:
        if not job.hashes or not self._ensure_registered():
            self._load_finished(job.req_id, ok=False)
            return
        try:
            # Without waiting for the acceptance, a refusal comes back as a failed completion.
            self.link.call("load", self.geometry.instance_id, self.rank, job.job_id, job.block_ids, job.hashes,
                           wait=self.settings.wait_for_acceptance)
        except (LinkUnavailable, LinkRejected) as exc:
            self._on_rejected(exc)
            self._load_finished(job.req_id, ok=False)
            return
        self._loads[job.job_id] = _Pending(self._deadline(), req_id=job.req_id, num_blocks=len(job.hashes))

    def wait_for_save(self) -> None:
        """Start this step's save behind an event recorded after the step's forward."""
        job = self._meta.save if self._meta is not None else None
        if job is None:
            return
        if not self.saves_here:
            self._save_finished(job.job_id, saved=0, skipped=0, failed=False)
            return
        if not self._ensure_registered():
            self._save_finished(job.job_id, saved=0, skipped=len(job.hashes), failed=True)
            return
        event = None
        if self._regions is not None and self._regions.device.type == "cuda":
            event = self._events.acquire()
            if event is None:
                logger.warning("rank %d: %d saves unanswered; skipping a save", self.rank, MAX_SAVE_EVENTS)
                self._save_finished(job.job_id, saved=0, skipped=len(job.hashes), failed=True)
                return
            event.record(torch.cuda.current_stream(self._regions.device))
        self._submit_save(job, event)

    def _submit_save(self, job: SaveJob, event: Any) -> None:
        try:
            handle = self._events.handle(event) if event is not None else None
        except Exception:  # torch could not export the event: without it the save cannot be ordered
            logger.exception("rank %d: cannot share the save's CUDA event; skipping the save", self.rank)
            self._events.discard(event)
            self._save_finished(job.job_id, saved=0, skipped=len(job.hashes), failed=True)
            return
        try:
            self.link.call(
                "save",
                self.geometry.instance_id,
                self.rank,
                job.job_id,
                job.block_ids,
                job.hashes,
                event=handle,
                wait=self.settings.wait_for_acceptance,
            )
        except (LinkUnavailable, LinkRejected) as exc:
            self._on_rejected(exc)
            if event is not None:
                self._events.discard(event)  # the server may have it: never re-record it
            self._save_finished(job.job_id, saved=0, skipped=len(job.hashes), failed=True)
            return
        self._saves[job.job_id] = _Pending(self._deadline(), num_blocks=len(job.hashes), event=event)

    def _on_rejected(self, exc: Exception) -> None:
        if isinstance(exc, LinkRejected):
            if exc.code in REGISTRATION_LOST:
                self._registered = False  # the server restarted or expired us: register again
            else:
                logger.error("PegaFlow refused a transfer of rank %d: %s", self.rank, exc)

    def collect(self, wait_s: float = 0.0) -> None:
        """Take the server's completions and give up jobs past their deadline. vLLM's step
        never waits (``wait_s=0``); tests may wait for a completion when idle."""
        if (self._loads or self._saves) and self.link.available():
            try:
                completions = self.link.call("poll_completions", wait_s)
            except (LinkUnavailable, LinkRejected):
                completions = []
            for raw in completions:
                self._on_completion(to_completion(raw))
        now = self._clock()
        late_loads = [j for j, p in self._loads.items() if p.deadline <= now]
        late_saves = [j for j, p in self._saves.items() if p.deadline <= now]
        if late_loads or late_saves:
            logger.warning(
                "rank %d: giving up %d load(s) and %d save(s) PegaFlow did not complete within %.1f s",
                self.rank,
                len(late_loads),
                len(late_saves),
                self.settings.transfer_timeout_s,
            )
        for job_id in late_loads:
            self._load_finished(self._loads.pop(job_id).req_id, ok=False)
        for job_id in late_saves:
            pending = self._saves.pop(job_id)
            if pending.event is not None:
                self._events.discard(pending.event)
            self._save_finished(job_id, saved=0, skipped=pending.num_blocks, failed=True)

    def _on_completion(self, done: Any) -> None:
        # A transfer sent without waiting: refused by the server (its code), or abandoned.
        if done.code in REGISTRATION_LOST:
            self._registered = False  # the server restarted or expired us: register again
        elif done.code is not None:
            logger.error("PegaFlow transfer %d of rank %d failed: %s", done.job_id, self.rank, done.error)
        if done.job_id in self._loads:
            pending = self._loads.pop(done.job_id)
            if not done.ok:
                logger.info("rank %d: load %d failed (%s, missing %s)", self.rank, done.job_id, done.error, done.missing)
            self._load_finished(pending.req_id, ok=done.ok and not done.missing)
        elif done.job_id in self._saves:
            pending = self._saves.pop(done.job_id)
            if pending.event is not None:
                if done.code is not None:
                    self._events.discard(pending.event)  # the server may hold it: never re-record it
                else:
                    self._events.release(pending.event)
            skipped = min(done.skipped, pending.num_blocks)
            if not done.ok:
                logger.info("rank %d: save %d failed: %s", self.rank, done.job_id, done.error)
            self._save_finished(done.job_id, saved=pending.num_blocks - skipped if done.ok else 0,
                                skipped=skipped if done.ok else pending.num_blocks, failed=not done.ok)
        else:
            logger.debug("rank %d: completion of unknown job %s ignored", self.rank, done.job_id)

    def _load_finished(self, req_id: str | None, ok: bool) -> None:
        if req_id is None:
            return
        self._out.finished_recving.add(req_id)
        if not ok:
            self._out.failed_recving.add(req_id)

    def _save_finished(self, job_id: int, *, saved: int, skipped: int, failed: bool) -> None:
        meta = self._out.worker_meta
        meta.saves_done[job_id] = meta.saves_done.get(job_id, 0) + 1
        meta.blocks_saved += saved
        meta.blocks_skipped += skipped
        meta.saves_failed += int(failed)

    def _deadline(self) -> float:
        return self._clock() + self.settings.transfer_timeout_s

    # ---- results -----------------------------------------------------------------------------

    def take_transfer_results(self) -> tuple[set[str], set[str]]:
        """Loads finished since the last call: ``(finished_recving, failed_recving)``, the
        failed ones in both sets as vLLM requires."""
        self.collect()
        out = self._out
        finished, failed = out.finished_recving, out.failed_recving
        out.finished_recving, out.failed_recving = set(), set()
        return finished, failed

    def take_worker_meta(self) -> PegaWorkerMetadata | None:
        meta = self._out.worker_meta
        if not meta.saves_done:
            return None
        self._out.worker_meta = PegaWorkerMetadata()
        return meta

    def has_pending(self) -> bool:
        return bool(self._loads or self._saves)

    def shutdown(self) -> None:
        """End the session: the server drops this rank's registration after its in-flight copies."""
        self.link.close()
