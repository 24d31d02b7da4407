"""The scheduler's part of the end-to-end replay, in the parent process.

A small model of what vLLM's scheduler and the connector's scheduler side do each step:
requests arrive at random (0..``max_new`` a step), their prompts share prefixes from a few
"families" (so prefixes repeat), a lookup asks the real server how many leading blocks it
holds on every rank, a hit becomes a load job (the request waits, as in
WAITING_FOR_REMOTE_KVS, until every rank reports it), the rest of the prompt is computed and
saved in one save job per step, decode steps add blocks that are saved too, and a finished
request's blocks are freed only once every save that reads them completed (invariant 2).
A load that failed on any rank is recomputed, as vLLM recomputes. Block ids are the same on
every rank, as vLLM's block tables are.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from e2e_shapes import chain_hash
from e2e_worker import StepPlan, StepResult
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob


@dataclass(frozen=True)
class WorkloadConfig:
    steps: int = 250
    families: int = 8
    family_blocks: int = 64
    max_unique: int = 16
    max_decode: int = 8
    max_new: int = 4
    max_active: int = 24
    sleep_prob: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "families", "family_blocks", "max_unique", "max_new", "max_active"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WorkloadConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(eq=False)
class Request:
    req_id: str
    hashes: list[bytes]  # the prompt's blocks
    decode_left: int
    block_ids: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> loading -> prefill -> decode -> done
    computed: int = 0  # prompt blocks holding their content
    decoded: int = 0
    load_blocks: int = 0
    load_reports: int = 0
    load_failed: bool = False
    save_jobs: set[int] = field(default_factory=set)

    @property
    def last_hash(self) -> bytes:
        return self.hashes[-1]


class Replay:
    """Plans steps against the real server; absorbs every rank's results."""

    def __init__(self, cfg: WorkloadConfig, num_blocks: int, tp: int, client: Any, instance_id: str) -> None:
        self.cfg, self.tp, self.client, self.instance_id = cfg, tp, client, instance_id
        self.rng = random.Random(cfg.seed)
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        self.families = []
        for f in range(cfg.families):
            chain, h = [], b"family-%d" % f
            for i in range(cfg.family_blocks):
                h = chain_hash(h, b"tok-%d" % i)
                chain.append(h)
            self.families.append(chain)
        self.waiting: deque[Request] = deque()
        self.active: dict[str, Request] = {}
        self.save_reports: Counter = Counter()
        self.save_owner: dict[int, list[Request]] = {}
        self.next_job = 1
        self.next_req = 0
        self.stats: Counter = Counter()
        self.mismatches: list[str] = []

    # ---- planning ----------------------------------------------------------------------------

    def _new_request(self) -> Request:
        cfg, rng = self.cfg, self.rng
        self.next_req += 1
        req_id = f"req-{self.next_req}"
        prefix = self.families[rng.randrange(cfg.families)][: rng.randint(0, cfg.family_blocks)]
        hashes, h = list(prefix), prefix[-1] if prefix else b"root"
        for i in range(rng.randint(0 if prefix else 1, cfg.max_unique)):
            h = chain_hash(h, f"{req_id}-p{i}".encode())
            hashes.append(h)
        return Request(req_id, hashes, rng.randint(0, cfg.max_decode))

    def _job_id(self) -> int:
        self.next_job += 1
        return self.next_job

    def plan(self, arrivals: bool = True) -> StepPlan | None:
        """The next step, or None when nothing can run now (waiting on transfers only)."""
        if arrivals:
            for _ in range(self.rng.randint(0, self.cfg.max_new)):
                self.waiting.append(self._new_request())
        meta = PegaConnectorMetadata()
        while self.waiting and len(self.active) < self.cfg.max_active:
            req = self.waiting[0]
            need = len(req.hashes) + req.decode_left
            if need > len(self.free):
                break
            self.waiting.popleft()
            req.block_ids = [self.free.pop() for _ in range(need)]
            self.active[req.req_id] = req
            self.stats["requests"] += 1
            hits = min(self.client.query(self.instance_id, req.hashes), len(req.hashes) - 1)
            if hits > 0:  # vLLM computes at least the last block itself
                job = LoadJob(self._job_id(), req.req_id, tuple(req.block_ids[:hits]), tuple(req.hashes[:hits]))
                meta.loads.append(job)
                req.state, req.load_blocks = "loading", hits
                self.stats["loads"] += 1
                self.stats["blocks_load_requested"] += hits
            else:
                req.state = "prefill"
        writes: list[tuple[int, bytes]] = []
        savers: list[Request] = []
        for req in self.active.values():
            if req.state == "prefill":
                new = list(zip(req.block_ids[req.computed : len(req.hashes)], req.hashes[req.computed :]))
                req.computed, req.state = len(req.hashes), "decode" if req.decode_left else "done"
            elif req.state == "decode" and self.rng.random() < 0.7:
                h = chain_hash(req.last_hash, f"{req.req_id}-d{req.decoded}".encode())
                new = [(req.block_ids[len(req.hashes) + req.decoded], h)]
                req.decoded += 1
                req.decode_left -= 1
                req.state = "decode" if req.decode_left else "done"
            else:
                continue
            writes += new
            savers.append(req)
        if writes:
            seen, ids, hashes = set(), [], []
            for b, h in writes:  # vLLM shares identical blocks on the GPU: one save per hash
                if h not in seen:
                    seen.add(h)
                    ids.append(b)
                    hashes.append(h)
            meta.save = SaveJob(self._job_id(), tuple(ids), tuple(hashes))
            self.save_owner[meta.save.job_id] = savers
            for req in savers:
                req.save_jobs.add(meta.save.job_id)
            self.stats["saves"] += 1
            self.stats["blocks_written"] += len(writes)
        if not writes and not meta.loads:
            return None
        self.stats["steps"] += 1
        return StepPlan(meta, tuple(writes), sleep=self.rng.random() < self.cfg.sleep_prob)

    # ---- results -----------------------------------------------------------------------------

    def absorb(self, results: list[StepResult]) -> None:
        for res in results:
            self.stats["blocks_checked"] += res.blocks_checked
            self.mismatches += res.mismatches
            for req_id in res.finished:
                req = self.active.get(req_id)
                if req is None or req.state != "loading":
                    self.mismatches.append(f"unexpected load completion of {req_id}")
                    continue
                req.load_reports += 1
                req.load_failed |= req_id in res.failed
            meta = res.worker_meta
            if meta is not None:
                self.stats["blocks_saved"] += meta.blocks_saved
                self.stats["blocks_skipped"] += meta.blocks_skipped
                self.stats["saves_failed"] += meta.saves_failed
                for job_id, count in meta.saves_done.items():
                    self.save_reports[job_id] += count
        for req in [r for r in self.active.values() if r.state == "loading" and r.load_reports == self.tp]:
            if req.load_failed:
                self.stats["loads_failed"] += 1
                req.computed = 0  # recompute the whole prompt, as vLLM does
            else:
                self.stats["loads_ok"] += 1
                self.stats["blocks_loaded"] += req.load_blocks
                req.computed = req.load_blocks
            req.state = "prefill"
        for job_id in [j for j, n in self.save_reports.items() if n >= self.tp]:
            del self.save_reports[job_id]
            for req in self.save_owner.pop(job_id, []):
                req.save_jobs.discard(job_id)
        for req in [r for r in self.active.values() if r.state == "done" and not r.save_jobs]:
            del self.active[req.req_id]
            self.free += req.block_ids
            self.stats["finished"] += 1

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def in_flight(self) -> int:
        return sum(r.state == "loading" for r in self.active.values()) + len(self.save_owner)
