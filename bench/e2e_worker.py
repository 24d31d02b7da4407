"""One vLLM-shaped worker process of the end-to-end harness (one per TP rank).

It allocates its KV cache as vLLM 0.33 does, builds the connector's real worker side
(:class:`pegaflow.connector.worker_side.ConnectorWorker` with the real client over the real
server) and registers the cache with it (CUDA IPC on a GPU, shared memory on the CPU). It
then does what vLLM's model runner does each step, in vLLM's order: ``handle_preemptions``,
``bind``, the forward (here: writing each computed block's deterministic content on the
compute stream, sometimes behind a long GPU kernel), ``start_load_kv`` (async loads start
after the forward launch), ``wait_for_save`` (the event recorded after the forward),
``take_transfer_results`` and ``take_worker_meta``, ``clear``. The parent process plays the
scheduler and sends each step's metadata.

Every finished load is checked bit for bit as soon as the worker sees it finish; the target
blocks are poisoned first, so a load that wrote nothing cannot pass.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from e2e_shapes import Contents, RankCache, Shape, build_rank_cache, chain_hash
from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import EngineLink
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, PegaWorkerMetadata, SaveJob
from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry

logger = logging.getLogger("e2e.worker")

POISON = 0x0BAD_0BAD_0BAD_0BAD
# Job ids of the figure phases start here, far above the replay's (which the parent numbers).
FIGURE_JOB_IDS = 1 << 40
# GPU "forward" sleeps: a long kernel before the writes, so a save that did not wait on the
# step's event would read the old bytes (~1-6 ms at ~1.7 GHz).
SLEEP_CYCLES = (2_000_000, 10_000_000)


# The connector settings the benchmarks can flip from their defaults: (flag, setting, its value
# with the flag, what the flag does).
CONNECTOR_SWITCHES = (
    ("--wait", "wait_for_acceptance", True, "each transfer call waits for the server's acceptance"),
    ("--no-board", "completion_board", False, "completions by ZMQ push only"),
    ("--no-fast", "fast_lane", False, "transfers sent by ZMQ, not Unix datagrams"),
)


def add_connector_switches(parser: Any) -> None:
    for flag, setting, value, effect in CONNECTOR_SWITCHES:
        parser.add_argument(flag, dest=f"flip_{setting}", action="store_true",
                            help=f"connector setting {setting} {str(value).lower()}: {effect}")


def connector_switches(args: Any) -> dict[str, bool]:
    """The settings of CONNECTOR_SWITCHES as the parsed flags leave them (WorkerConfig fields):
    the connector's defaults where no flag is given."""
    return {setting: value if getattr(args, f"flip_{setting}") else getattr(ConnectorSettings, setting)
            for _, setting, value, _ in CONNECTOR_SWITCHES}


@dataclass(frozen=True)
class WorkerConfig:
    rank: int
    tp: int
    device: str  # "cpu" or "cuda:N"
    shape: Shape
    layout: str
    num_blocks: int
    endpoint: str
    instance_id: str
    ttft_tokens: tuple[int, ...] = ()
    smoke: bool = False
    seed: int = 0
    # The connector settings of CONNECTOR_SWITCHES (defaults: the connector's).
    wait_for_acceptance: bool = ConnectorSettings.wait_for_acceptance
    completion_board: bool = ConnectorSettings.completion_board
    fast_lane: bool = ConnectorSettings.fast_lane


@dataclass(frozen=True)
class StepPlan:
    """One scheduler step: the connector metadata and the blocks the forward computes."""

    meta: PegaConnectorMetadata
    writes: tuple[tuple[int, bytes], ...] = ()  # (block id, hash)
    sleep: bool = False


@dataclass
class StepResult:
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    worker_meta: PegaWorkerMetadata | None = None
    blocks_checked: int = 0
    mismatches: list[str] = field(default_factory=list)


class Rank:
    """The worker's state: its cache, the connector's worker side, and what each block holds."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        replicated = cfg.layout == "MLA"
        self.cache: RankCache = build_rank_cache(cfg.shape, cfg.layout, cfg.num_blocks, cfg.tp, self.device)
        self.regions = self.cache.regions
        self.block_bytes = self.regions.block_bytes
        self.contents = Contents(self.regions, cfg.rank, replicated)
        settings = ConnectorSettings(endpoint=cfg.endpoint, instance_id=cfg.instance_id, rpc_timeout_s=10.0,
                                     transfer_timeout_s=120.0, wait_for_acceptance=cfg.wait_for_acceptance,
                                     completion_board=cfg.completion_board, fast_lane=cfg.fast_lane)
        geometry = InstanceGeometry(cfg.instance_id, cfg.shape.name, f"auto:{cfg.shape.dtype}", cfg.layout,
                                    cfg.shape.block_size, cfg.tp, replicated)
        self.worker = ConnectorWorker(settings, EngineLink(settings, f"e2e rank {cfg.rank}"), geometry, rank=cfg.rank)
        self.worker.register_kv_caches(self.cache.kv_caches, self.cache.kv_cache_config)
        if not self.worker._registered:
            raise RuntimeError(f"rank {cfg.rank}: registration with the server failed (see the log)")
        self.held: dict[int, int] = {}  # block id -> content key it holds now (known blocks only)
        self.known: dict[bytes, int] = {}  # hash -> content key, where not key_of(hash)
        self.load_jobs: dict[str, list[tuple[list[int], list[bytes]]]] = {}
        self._job_id = FIGURE_JOB_IDS + cfg.rank * (1 << 30)
        self._gen = torch.Generator().manual_seed(cfg.seed * 1000 + cfg.rank)
        self._fresh = 0
        self.figures: dict[str, Any] = {}  # state the figure phases keep between phases

    # ---- contents --------------------------------------------------------------------------

    def key(self, block_hash: bytes) -> int:
        key = self.known.get(block_hash)
        return self.contents.key_of(block_hash) if key is None else key

    def write(self, block_ids: list[int], keys: list[int], delay: Any = None) -> None:
        self.contents.write(block_ids, keys, delay)
        self.held.update(zip(block_ids, keys))

    def poison(self, block_ids: list[int]) -> None:
        """Overwrite blocks about to be loaded and wait for it (the server's copy is not ordered
        after this process's stream)."""
        self.write(block_ids, [POISON ^ b for b in block_ids])
        self.sync()

    def check(self, block_ids: list[int], hashes: list[bytes]) -> list[str]:
        keys = [self.key(h) for h in hashes]
        bad = self.contents.mismatches(block_ids, keys)
        if not bad:
            self.held.update(zip(block_ids, keys))
        return bad

    def check_held(self) -> tuple[int, list[str]]:
        """Every block with a known content still holds it (no stray writes anywhere)."""
        ids = sorted(self.held)
        return len(ids), self.contents.mismatches(ids, [self.held[b] for b in ids])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    # ---- the model runner's step -----------------------------------------------------------

    def step(self, plan: StepPlan) -> StepResult:
        meta = plan.meta
        load_ids = [b for job in meta.loads for b in job.block_ids]
        if load_ids:
            self.poison(load_ids)
        for job in meta.loads:
            self.load_jobs.setdefault(job.req_id, []).append((list(job.block_ids), list(job.hashes)))
        w = self.worker
        w.handle_preemptions(meta)
        w.bind(meta)
        if plan.writes:  # the forward
            delay = None
            if plan.sleep and self.cuda:
                cycles = int(torch.randint(*SLEEP_CYCLES, (1,), generator=self._gen))
                delay = lambda: torch.cuda._sleep(cycles)  # noqa: E731
            ids = [b for b, _ in plan.writes]
            self.write(ids, [self.contents.key_of(h) for _, h in plan.writes], delay)
        w.start_load_kv()
        w.wait_for_save()
        result = self._results()
        w.clear()
        return result

    def poll(self, wait_s: float) -> StepResult:
        self.worker.collect(wait_s)
        return self._results()

    def _results(self) -> StepResult:
        finished, failed = self.worker.take_transfer_results()
        out = StepResult(finished, failed, self.worker.take_worker_meta())
        for req in finished:
            jobs = self.load_jobs.pop(req, [])
            if req in failed:
                continue
            for ids, hashes in jobs:
                out.blocks_checked += len(ids)
                out.mismatches += [f"rank {self.cfg.rank} load of {req}: {m}" for m in self.check(ids, hashes)]
        return out

    # ---- figure phases: one job at a time, from the worker's own id space ------------------

    def fresh_hashes(self, n: int) -> list[bytes]:
        """Hashes not saved before, the same sequence on every rank (a TP block is READY only
        once every rank saved it)."""
        start, self._fresh = self._fresh, self._fresh + n
        return [chain_hash(b"e2e-figure", i.to_bytes(8, "little")) for i in range(start, start + n)]

    def next_job(self) -> int:
        self._job_id += 1
        return self._job_id

    def submit_save(self, block_ids: list[int], hashes: list[bytes]) -> int:
        job_id = self.next_job()
        self.worker.bind(PegaConnectorMetadata(save=SaveJob(job_id, tuple(block_ids), tuple(hashes))))
        self.worker.wait_for_save()
        self.worker.clear()
        return job_id

    def submit_load(self, block_ids: list[int], hashes: list[bytes]) -> str:
        job_id = self.next_job()
        req = f"fig-{job_id}"
        self.worker.bind(PegaConnectorMetadata(loads=[LoadJob(job_id, req, tuple(block_ids), tuple(hashes))]))
        self.worker.start_load_kv()
        self.worker.clear()
        return req

    def wait(self, wait_s: float = 0.05) -> tuple[set[int], set[str], set[str], PegaWorkerMetadata | None]:
        """(save jobs done, loads finished, loads failed, worker meta) since the last call."""
        self.worker.collect(wait_s)
        finished, failed = self.worker.take_transfer_results()
        meta = self.worker.take_worker_meta()
        return set(meta.saves_done) if meta else set(), finished, failed, meta

    def shutdown(self) -> None:
        self.worker.shutdown()


def worker_main(cfg: WorkerConfig, conn: Any, barrier: Any) -> None:
    """Process entry point: build the rank, answer the parent's commands until "stop"."""
    logging.basicConfig(level=os.environ.get("E2E_LOG", "WARNING"),
                        format=f"%(asctime)s rank{cfg.rank} %(levelname)s %(name)s: %(message)s")
    import e2e_figures as figures

    try:
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(cfg.device))
        torch.manual_seed(cfg.seed + cfg.rank)
        prefill = figures.measure_prefill(cfg, barrier) if cfg.ttft_tokens else {}
        t0 = time.monotonic()
        rank = Rank(cfg)
        conn.send(("ready", {"block_bytes": rank.block_bytes, "regions": len(rank.regions.regions),
                             "setup_s": time.monotonic() - t0, "prefill": prefill,
                             "card": torch.cuda.get_device_name(rank.device) if rank.cuda else "cpu"}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "stop":
                rank.shutdown()
                conn.send(("ok", None))
                return
            if cmd == "step":
                reply = rank.step(arg)
            elif cmd == "poll":
                reply = rank.poll(arg)
            elif cmd == "check_held":
                reply = rank.check_held()
            else:
                reply = figures.run_phase(rank, cmd, arg, barrier)
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))
