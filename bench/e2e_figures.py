"""The figure phases, run inside a worker process through the whole stack (worker side ->
client -> server -> engine -> kernels -> pool and back), each beside its ceiling measured in
the same process on the same card.

Bulk phases move whole "ranges" (a random, scattered set of ``job_blocks`` block ids each,
as a paged cache holds a request's blocks). Each round touches every range at most once, so
every load is checked bit for bit after the round, outside the timed window (a check's kernels
would take GPU time slices from the server's copies). Interference: ``e2e_interference``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from common import cuda_time_ms

GIB = 1 << 30


def _ms(fn: Any, cuda: bool, repeat: int = 10) -> float:
    if cuda:
        return cuda_time_ms(fn, warmup=2, repeat=repeat)
    times = []
    for _ in range(max(3, repeat // 3)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _once_ms(fn: Any, cuda: bool) -> float:
    """One call, no warm-up (CUDA events around it on the current stream)."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


# ---- prefill of a Llama-3-8B-shaped model (time to first token without a cache) ------------


def llama_config(smoke: bool, tp: int) -> Any:
    """Llama-3-8B (or its TP shard: heads and MLP split, all-reduce not modelled)."""
    from transformers import LlamaConfig

    if smoke:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256)
    else:
        dims = dict(hidden_size=4096, intermediate_size=14336 // tp, num_hidden_layers=32,
                    num_attention_heads=32 // tp, num_key_value_heads=8 // tp, head_dim=128, vocab_size=128256)
    if dims["head_dim"] == dims["hidden_size"] // dims["num_attention_heads"]:
        del dims["head_dim"]  # the default; only TP shards need it (transformers >= 4.45)
    config = LlamaConfig(max_position_embeddings=16384, attn_implementation="sdpa", **dims)
    config._attn_implementation = "sdpa"
    return config


def measure_prefill(cfg: Any, barrier: Any) -> dict[str, Any]:
    """Prefill milliseconds per prompt length (random weights, bf16, sdpa); the model is freed
    before anything else is allocated."""
    try:
        from transformers import LlamaModel
    except ImportError as exc:
        barrier.wait()
        return {"error": f"transformers unavailable: {exc}"}
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    config = llama_config(cfg.smoke, cfg.tp)
    out: dict[str, Any] = {"ms": {}, "layers": config.num_hidden_layers, "shard": f"tp{cfg.tp}" if cfg.tp > 1 else "full"}
    model = None
    t0 = time.monotonic()
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            model = LlamaModel(config).eval()
    except Exception as exc:  # reported in the results; the other ranks must still pass the barrier
        out["error"] = f"building the model failed: {type(exc).__name__}: {exc}"
    finally:
        torch.set_default_dtype(default)
    out["build_s"] = time.monotonic() - t0
    barrier.wait()
    if model is not None:
        with torch.inference_mode():
            for n in cfg.ttft_tokens:
                ids = torch.randint(0, config.vocab_size, (1, n), device=device)
                out["ms"][n] = _ms(lambda: model(input_ids=ids, use_cache=False), cuda, repeat=3)
        del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---- bulk transfers through the stack ------------------------------------------------------


@dataclass
class Job:
    direction: str  # "save" or "load"
    block_ids: list[int]
    hashes: list[bytes]
    failed: bool = False  # a load the server reported failed (its blocks were evicted): not checked


@dataclass
class Tally:
    """One direction's progress in a run of jobs."""

    start: float = math.inf
    end: float = 0.0
    blocks: int = 0
    failed: int = 0
    skipped: int = 0
    done: list[tuple[float, int]] = field(default_factory=list)  # (time, blocks) of each completion


def run_jobs(rank: Any, jobs: list[Job], inflight: int) -> dict[str, Tally]:
    """Submit ``jobs`` keeping ``inflight`` of each direction in flight; wait for all."""
    queues = {d: deque(j for j in jobs if j.direction == d) for d in ("save", "load")}
    pending: dict[str, dict[Any, Job]] = {"save": {}, "load": {}}
    tally = {d: Tally() for d in queues}
    while any(queues.values()) or any(pending.values()):
        # One job per direction in turn: filling one direction's slots before the other's
        # would submit the loads of a saves+loads run only after every save's acceptance
        # (each waits for the server to book and launch it), not beside them.
        submitted = True
        while submitted:
            submitted = False
            for d, queue in queues.items():
                if queue and len(pending[d]) < inflight:
                    job = queue.popleft()
                    if d == "save":
                        for b, h in zip(job.block_ids, job.hashes):
                            rank.known[h] = rank.held[b]
                    tally[d].start = min(tally[d].start, time.monotonic())
                    key = rank.submit_save(job.block_ids, job.hashes) if d == "save" else \
                        rank.submit_load(job.block_ids, job.hashes)
                    pending[d][key] = job
                    submitted = True
        saves, finished, failed, meta = rank.wait(0.05)
        now = time.monotonic()
        if meta is not None:
            tally["save"].skipped += meta.blocks_skipped
            tally["save"].failed += meta.saves_failed
        for job_id in saves & pending["save"].keys():
            job = pending["save"].pop(job_id)
            tally["save"].end = now
            tally["save"].done.append((now, len(job.block_ids)))
        for req in finished & pending["load"].keys():
            job = pending["load"].pop(req)
            t = tally["load"]
            t.end = now
            if req in failed:
                t.failed += 1
                job.failed = True
            else:
                t.done.append((now, len(job.block_ids)))
    for t in tally.values():
        t.blocks = sum(n for _, n in t.done)
    if tally["save"].done:  # a skipped block was not copied: count only what was
        tally["save"].blocks -= tally["save"].skipped
    return tally


def _rate(rank: Any, t: Tally) -> dict[str, float]:
    return {"bytes": t.blocks * rank.block_bytes, "start": t.start, "end": t.end, "failed": t.failed,
            "skipped": t.skipped}


def _check_loads(rank: Any, jobs: list[Job]) -> list[str]:
    bad: list[str] = []
    for job in jobs:
        # A failed load is a reported cache miss (vLLM recomputes); only successful ones must
        # hold the saved bytes. Failures are counted in the phase's rates.
        if job.direction == "load" and not job.failed:
            bad += rank.check(job.block_ids, job.hashes)
    return bad


class Figures:
    """Per-rank state of the figure phases: the ranges, the saved jobs, the ceiling buffers."""

    def __init__(self, rank: Any, arg: dict[str, Any]) -> None:
        self.rank = rank
        n = arg["job_blocks"]
        gen = torch.Generator().manual_seed(7)  # the same ids on every rank, as vLLM's block tables
        perm = torch.randperm(rank.cfg.num_blocks, generator=gen).tolist()
        self.ranges = [perm[i : i + n] for i in range(0, len(perm) - n + 1, n)]
        if len(self.ranges) < 4:
            raise ValueError(f"{rank.cfg.num_blocks} blocks hold fewer than 4 ranges of {n}")
        self.perm = perm
        keys = torch.randint(-(1 << 62), 1 << 62, (len(perm),), generator=gen).tolist()
        rank.write(perm, keys)
        rank.sync()
        self.saved: list[list[bytes]] = []  # hashes of the last save round, one list per range
        pin = rank.cuda
        size = arg["ceiling_bytes"]
        dev = rank.device
        self.host = [torch.empty(max(size, arg.get("ttft_bytes", 0)), dtype=torch.uint8, pin_memory=pin),
                     torch.empty(size, dtype=torch.uint8, pin_memory=pin)]
        self.gpu = [torch.empty(t.numel(), dtype=torch.uint8, device=dev) for t in self.host]
        self.streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)] if rank.cuda else []

    def copy_ms(self, direction: str, nbytes: int, repeat: int = 10) -> float:
        """One contiguous copy of ``nbytes`` between pinned host memory and the GPU."""
        host, gpu = self.host[0][:nbytes], self.gpu[0][:nbytes]
        if direction == "save":
            return _ms(lambda: host.copy_(gpu, non_blocking=True), self.rank.cuda, repeat)
        return _ms(lambda: gpu.copy_(host, non_blocking=True), self.rank.cuda, repeat)

    def both_ms(self, nbytes: int) -> float:
        """A save-direction and a load-direction copy at once, on two streams."""
        h0, g0, h1, g1 = self.host[0][:nbytes], self.gpu[0][:nbytes], self.host[1][:nbytes], self.gpu[1][:nbytes]
        if not self.rank.cuda:
            return _ms(lambda: (h0.copy_(g0), g1.copy_(h1)), False)

        def both() -> None:
            cur = torch.cuda.current_stream()
            for s in self.streams:
                s.wait_stream(cur)
            with torch.cuda.stream(self.streams[0]):
                h0.copy_(g0, non_blocking=True)
            with torch.cuda.stream(self.streams[1]):
                g1.copy_(h1, non_blocking=True)
            for s in self.streams:
                cur.wait_stream(s)

        return _ms(both, True)


def phase_prepare(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    rank.figures["f"] = Figures(rank, arg)
    return {"ranges": len(rank.figures["f"].ranges)}


def phase_ceilings(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, float]:
    f: Figures = rank.figures["f"]
    n = f.host[1].numel()
    barrier.wait()
    return {"bytes": n, "save_ms": f.copy_ms("save", n), "load_ms": f.copy_ms("load", n), "both_ms": f.both_ms(n)}


def phase_bulk(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """``arg["mode"]``: "save" (fresh hashes from every range), "load" (the last save round's
    hashes into every range, rotated each round), "both" (half the ranges save, half load)."""
    f: Figures = rank.figures["f"]
    mode, rounds_out, bad = arg["mode"], [], []
    for r in range(arg["rounds"]):
        if mode == "save":
            jobs = [Job("save", ids, rank.fresh_hashes(len(ids))) for ids in f.ranges]
        elif mode == "load":
            jobs = [Job("load", f.ranges[(i + r + 1) % len(f.ranges)], h) for i, h in enumerate(f.saved)]
        else:
            half = len(f.ranges) // 2
            jobs = []
            for i in range(half):  # interleaved, so both directions start together
                jobs.append(Job("save", f.ranges[i], rank.fresh_hashes(len(f.ranges[i]))))
                jobs.append(Job("load", f.ranges[half + i], f.saved[(i + r) % len(f.saved)]))
        loads = [b for j in jobs if j.direction == "load" for b in j.block_ids]
        if loads:
            rank.poison(loads)
        barrier.wait()
        tally = run_jobs(rank, jobs, arg["inflight"])
        bad += _check_loads(rank, jobs)
        rounds_out.append({d: _rate(rank, t) for d, t in tally.items() if t.done or t.failed})
        if mode == "save":
            f.saved = [j.hashes for j in jobs]
    return {"rounds": rounds_out, "mismatches": bad[:5]}


def _await(rank: Any, key: Any) -> tuple[float, bool]:
    """Wait for one job; (completion time, ok)."""
    while True:
        saves, finished, failed, meta = rank.wait(0.05)
        if key in saves:
            return time.monotonic(), bool(meta and not meta.saves_failed)
        if key in finished:
            return time.monotonic(), key not in failed


def _latencies(rank: Any, f: Figures, k: int, n: int, barrier: Any, target: list[int]) -> dict[str, Any]:
    """``n`` saves then ``n`` loads of ``k`` blocks, one at a time: milliseconds each."""
    # "<d>_call": the part of each spent in the submitting call (the request and its
    # acceptance with --wait; by default the send alone); the rest is the copy, the server's
    # completion and its push.
    out: dict[str, Any] = {"save": [], "load": [], "save_call": [], "load_call": [], "failed": 0, "mismatches": []}
    saved = []
    src = f.ranges[0][:k]
    for _ in range(n):
        hashes = rank.fresh_hashes(k)
        for b, h in zip(src, hashes):
            rank.known[h] = rank.held[b]
        t0 = time.monotonic()
        job = rank.submit_save(src, hashes)
        out["save_call"].append((time.monotonic() - t0) * 1e3)
        end, ok = _await(rank, job)
        out["save"].append((end - t0) * 1e3)
        out["failed"] += not ok
        saved.append(hashes)
    barrier.wait()  # a TP block is loadable once every rank saved it
    for hashes in saved:
        rank.poison(target)
        t0 = time.monotonic()
        req = rank.submit_load(target, hashes)
        out["load_call"].append((time.monotonic() - t0) * 1e3)
        end, ok = _await(rank, req)
        out["load"].append((end - t0) * 1e3)
        out["failed"] += not ok
        if ok:  # a failed load leaves the blocks as they were (vLLM recomputes them): counted above
            out["mismatches"] += rank.check(target, hashes)
    return out


def phase_overhead(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    f: Figures = rank.figures["f"]
    out = {}
    for k in arg["sizes"]:
        res = _latencies(rank, f, k, arg["n"], barrier, f.ranges[1][:k])
        nbytes = k * rank.block_bytes
        res["copy_ms"] = {"save": f.copy_ms("save", nbytes, 20), "load": f.copy_ms("load", nbytes, 20)}
        res["mismatches"] = res["mismatches"][:5]
        out[k] = res
    return out


def phase_ttft(rank: Any, arg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    """Load time through the stack of each prompt's KV (saved first), and its contiguous copy."""
    f: Figures = rank.figures["f"]
    out = {}
    for tokens in arg["tokens"]:
        k = -(-tokens // rank.cfg.shape.block_size)
        if 2 * k > len(f.perm):
            raise ValueError(f"{tokens} tokens need {k} blocks: the cache holds {len(f.perm)}")
        src, dst = f.perm[:k], f.perm[-k:]
        hashes = rank.fresh_hashes(k)
        for b, h in zip(src, hashes):
            rank.known[h] = rank.held[b]
        _, ok = _await(rank, rank.submit_save(src, hashes))
        barrier.wait()
        times, bad = [], []
        for _ in range(arg["repeat"]):
            rank.poison(dst)
            t0 = time.monotonic()
            end, ok2 = _await(rank, rank.submit_load(dst, hashes))
            times.append((end - t0) * 1e3)
            ok = ok and ok2
            bad += rank.check(dst, hashes)
        out[tokens] = {"blocks": k, "bytes": k * rank.block_bytes, "load_ms": times, "ok": ok,
                       "copy_ms": f.copy_ms("load", k * rank.block_bytes), "mismatches": bad[:5]}
    return out


def run_phase(rank: Any, cmd: str, arg: Any, barrier: Any) -> Any:
    from e2e_interference import phase_interference

    phases = {"prepare": phase_prepare, "ceilings": phase_ceilings, "bulk": phase_bulk, "overhead": phase_overhead,
              "ttft": phase_ttft, "interference": phase_interference}
    if cmd not in phases:
        raise ValueError(f"unknown command {cmd!r}")
    return phases[cmd](rank, arg, barrier)
