"""Interference: a compute-bound bf16 matmul loop in the worker process while the server
saves (or loads) that worker's blocks at full speed, in interleaved rounds (alone, with,
alone, with, ...), the ranks in step. A pump thread keeps jobs in flight through the
connector's worker side; its loads are checked by the final content of their targets (a
check between jobs would take GPU time from the measurement).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch

from e2e_figures import Figures, Job, _once_ms
from e2e_shapes import chain_hash


class Pump(threading.Thread):
    """Keeps ``inflight`` jobs of one direction in flight until stopped; counts what completes."""

    def __init__(self, rank: Any, jobs: Any, inflight: int) -> None:
        super().__init__(daemon=True)
        self.rank, self.jobs, self.inflight = rank, jobs, inflight
        self.stop_flag = threading.Event()
        self.started_copying = threading.Event()
        self.done: list[tuple[float, int]] = []
        self.last: dict[int, Job] = {}  # target range -> the last load into it
        self.failed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.rank.cuda:
                torch.cuda.set_device(self.rank.device)  # a new thread starts on device 0
                side = torch.cuda.Stream(self.rank.device)
                with torch.cuda.stream(side):  # the blocks were written long ago: no forward to wait for
                    self._pump()
            else:
                self._pump()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.started_copying.set()

    def _pump(self) -> None:
        rank, pending = self.rank, {}
        while not self.stop_flag.is_set() or pending:
            while not self.stop_flag.is_set() and len(pending) < self.inflight:
                slot, job = next(self.jobs)
                if job.direction == "save":
                    for b, h in zip(job.block_ids, job.hashes):
                        rank.known[h] = rank.held[b]
                    key = rank.submit_save(job.block_ids, job.hashes)
                else:
                    key = rank.submit_load(job.block_ids, job.hashes)
                pending[key] = (slot, job)
            saves, finished, failed, _ = rank.wait(0.02)
            now = time.monotonic()
            for key in (saves | finished) & pending.keys():
                slot, job = pending.pop(key)
                if key in failed:
                    self.failed += 1
                    continue
                self.done.append((now, len(job.block_ids)))
                if job.direction == "load":
                    self.last[slot] = job
                self.started_copying.set()

    def blocks_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in list(self.done) if t0 <= t <= t1)


def phase_interference(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    f: Figures = rank.figures["f"]
    direction, n, k = arg["direction"], arg["matmul_n"], arg["job_blocks"]
    phase_no = rank.figures["pump_phases"] = rank.figures.get("pump_phases", 0) + 1
    a = torch.randn(n, n, device=rank.device).to(torch.bfloat16)
    b = torch.randn(n, n, device=rank.device).to(torch.bfloat16)
    c = torch.empty(n, n, device=rank.device, dtype=torch.bfloat16)
    targets = [ids[i : i + k] for ids in f.ranges[len(f.ranges) // 2 :] for i in range(0, len(ids) - k + 1, k)]
    sources = [ids[i : i + k] for ids in f.ranges[: len(f.ranges) // 2] for i in range(0, len(ids) - k + 1, k)]
    loadable = [h[i : i + k] for h in f.saved for i in range(0, len(h) - k + 1, k)]

    def jobs(round_no: int):
        # Pump saves name their blocks by (round, job, block), not from the shared fresh
        # sequence: ranks run different numbers of pump jobs, and a TP entry is READY only once
        # every rank saved it (one rank's extra jobs stay WRITING until the write timeout).
        for i in range(1 << 62):
            if direction == "save":
                ids = sources[i % len(sources)]
                tag = b"pump-%d-%d-%d" % (phase_no, round_no, i)
                yield i % len(sources), Job("save", ids, [chain_hash(tag, j.to_bytes(4, "little")) for j in range(len(ids))])
            else:
                slot = i % len(targets)
                yield slot, Job("load", targets[slot], loadable[i % len(loadable)])

    def eager(iters: int):
        return lambda: [torch.matmul(a, b, out=c) for _ in range(iters)]

    def matmuls(iters: int, run: Any = None) -> tuple[float, float, float]:
        rank.sync()
        t0 = time.monotonic()
        ms = _once_ms(run or eager(iters), rank.cuda)
        return 2 * n**3 * iters / (ms * 1e-3) / 1e12, t0, time.monotonic()

    matmuls(2)  # cuBLAS warm-up
    rate, _, _ = matmuls(10)
    iters = max(1, int(arg["target_ms"] * 1e-3 * rate * 1e12 / (2 * n**3)))
    # The loop is launched as one CUDA graph, as vLLM launches its forward passes: launched one
    # matmul at a time from Python, it would also measure how long this process's main thread
    # waits for the GIL while the pump thread runs the connector's code.
    run = _graph(eager(iters), rank) if rank.cuda else eager(iters)
    if direction == "load":
        rank.poison([x for t in targets for x in t])
    alone, with_, gbps, pumps = [], [], [], []
    for _ in range(arg["rounds"]):
        barrier.wait()
        alone.append(matmuls(iters, run)[0])
        barrier.wait()
        pump = Pump(rank, jobs(len(pumps)), arg["inflight"])
        pump.start()
        pump.started_copying.wait(timeout=60)
        tflops, t0, t1 = matmuls(iters, run)
        pump.stop_flag.set()
        pump.join()
        if pump.error is not None:
            raise pump.error
        with_.append(tflops)
        gbps.append(pump.blocks_between(t0, t1) * rank.block_bytes / (t1 - t0) / 1e9)
        pumps.append(pump)
    ratios = [w / statistics.mean(alone[i : i + 2]) for i, w in enumerate(with_)]
    bad: list[str] = []
    if direction == "load":
        last: dict[int, Job] = {}
        for p in pumps:
            last.update(p.last)
        for job in last.values():
            bad += rank.check(job.block_ids, job.hashes)
    return {"alone": alone, "with": with_, "ratios": ratios, "gbps": gbps, "iters": iters, "matmul_n": n,
            "failed": sum(p.failed for p in pumps), "mismatches": bad[:5]}


def _graph(fn: Any, rank: Any) -> Any:
    """``fn``'s kernels captured once; the returned call replays them with one launch."""
    side = torch.cuda.Stream(rank.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # capture needs its workspaces allocated first
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
