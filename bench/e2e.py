"""End to end: vLLM-shaped worker processes, the real server, every load checked, the figures.

Starts ``python -m pegaflow.server`` (GPU mode on ``--devices``, or CPU mode with ``--smoke``),
spawns one worker process per TP rank (``e2e_worker``: a KV cache allocated as vLLM 0.33 does,
the connector's real worker side, the real client, CUDA IPC) and then:

1. replays a workload (``e2e_workload``): random arrivals, repeating prefixes that load,
   prefills and decode steps that save, many jobs in flight; every load is checked bit for
   bit, and at the end every block whose content is known is checked again;
2. measures the figures through the whole stack, each beside its ceiling measured in the
   same run (``e2e_figures``): save / load / both at once (Llama-3-8B, 512-block jobs, several
   in flight), control overhead per request, interference with a bf16 matmul loop in the
   worker, and the modelled time to first token at 1K / 4K / 10K tokens.

    python3 bench/e2e.py --json bench/results/e2e-h100.json            # one GPU, < 6 min
    python3 bench/e2e.py --tp 2 --json bench/results/e2e-h100-tp2.json # two GPUs, one server
    python3 bench/e2e.py --smoke                                       # CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

import torch  # noqa: E402

from common import print_table, write_json  # noqa: E402
from e2e_report import build_rows, summarize  # noqa: E402
from e2e_shapes import LAYOUTS, LLAMA3_8B, SMOKE  # noqa: E402
from e2e_worker import WorkerConfig, add_connector_switches, connector_switches, worker_main  # noqa: E402
from e2e_workload import Replay, WorkloadConfig  # noqa: E402

from pegaflow.engine.size import parse_size  # noqa: E402

GIB = 1 << 30
START = time.monotonic()


def log(message: str) -> None:
    print(f"[e2e {time.monotonic() - START:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here (shared/bench-results.md format)")
    p.add_argument("--smoke", action="store_true", help="CPU mode, tiny shapes: checks the flow, measures nothing")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one worker process and GPU each)")
    p.add_argument("--devices", default=None, help="GPU ids for the ranks (default 0..tp-1)")
    p.add_argument("--layout", default="LBNHC", choices=LAYOUTS, help="vLLM 0.33 KV cache layout")
    p.add_argument("--cache-gib", type=float, default=8.0, help="KV cache per rank (GPU)")
    p.add_argument("--pool-size", default=None, help="server pool (default 24gb per rank, so the saved set of every rank fits beside a round of fresh saves; smoke 512kb)")
    p.add_argument("--staging-size", default=None, help="the server's --staging-size (default: the server's)")
    p.add_argument("--save-path", default=None, help="the server's --save-path (default: the server's)")
    p.add_argument("--switch-interval", default=None, help="the server's --switch-interval (default: the server's)")
    p.add_argument("--spin-us", default=None, help="the server's --spin-us (default: the server's)")
    p.add_argument("--steps", type=int, default=None, help="replay steps (default 250; smoke 60)")
    p.add_argument("--job-blocks", type=int, default=None, help="blocks per bulk job (default 512; smoke 8)")
    p.add_argument("--inflight", type=int, default=3, help="bulk jobs in flight per direction")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each bulk figure")
    p.add_argument("--interference-rounds", type=int, default=None, help="alone/with rounds (default 12)")
    p.add_argument("--interference-job-blocks", type=int, default=128,
                   help="blocks per transfer beside the matmul, at most --job-blocks (default 128: a busy path "
                        "loads their 64-block pieces by 2D DMA; longer loads have staged middles)")
    p.add_argument("--overhead-n", type=int, default=None, help="requests per size for the overhead (default 100)")
    p.add_argument("--ttft-tokens", default=None, help="prompt lengths (default 1024,4096,10240)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: replay,bulk,overhead,interference,ttft")
    add_connector_switches(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a worker may take for one command")
    args = p.parse_args(argv)
    if args.interference_job_blocks < 1:
        p.error(f"--interference-job-blocks must be at least 1, got {args.interference_job_blocks}")
    return args


class Workers:
    """The worker processes and their pipes; a command goes to every rank at once."""

    def __init__(self, configs: list[WorkerConfig], timeout_s: float) -> None:
        ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.timeout_s = timeout_s
        self.barrier = ctx.Barrier(len(configs))
        self.conns, self.procs = [], []
        for cfg in configs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(cfg, child, self.barrier), daemon=True,
                               name=f"e2e-rank{cfg.rank}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.ready = self._replies("start")

    def _replies(self, what: str) -> list[Any]:
        out = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(self.timeout_s):
                raise RuntimeError(f"rank {rank} gave no answer to {what!r} within {self.timeout_s} s")
            status, value = conn.recv()
            if status == "error":
                raise RuntimeError(f"rank {rank} failed in {what!r}:\n{value}")
            out.append(value)
        return out

    def call(self, cmd: str, arg: Any = None) -> list[Any]:
        for conn in self.conns:
            conn.send((cmd, arg))
        return self._replies(cmd)

    def close(self) -> None:
        try:
            self.call("stop")
        except Exception as exc:  # a rank already gone: still reap the others
            log(f"stopping the workers: {exc}")
        # Not join(): its sentinel pipe stays open while a grandchild that inherited it lives
        # (torch's shm manager, in CPU mode), though the worker itself has exited.
        deadline = time.monotonic() + 30
        for proc in self.procs:
            while proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.is_alive():
                proc.kill()


def run_replay(workers: Workers, replay: Replay, steps: int) -> dict[str, Any]:
    t0 = time.monotonic()
    max_inflight = 0
    for step in range(steps):
        plan = replay.plan(arrivals=True)
        replay.absorb(workers.call("step", plan) if plan else workers.call("poll", 0.002))
        max_inflight = max(max_inflight, replay.in_flight())
        if step % 50 == 49:
            log(f"replay step {step + 1}/{steps}: {dict(replay.stats)}")
    deadline = time.monotonic() + 120
    while not replay.idle and time.monotonic() < deadline:  # drain: no arrivals
        plan = replay.plan(arrivals=False)
        replay.absorb(workers.call("step", plan) if plan else workers.call("poll", 0.01))
    held = workers.call("check_held")
    stats = dict(replay.stats)
    stats.update(max_inflight_jobs=max_inflight, drained=replay.idle, seconds=round(time.monotonic() - t0, 2),
                 blocks_rechecked=sum(n for n, _ in held))
    mismatches = replay.mismatches + [m for _, bad in held for m in bad]
    stats["mismatches"] = len(mismatches)
    return {"stats": stats, "mismatches": mismatches[:10]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from pegaflow.client import PegaClient
    from pegaflow.server.spawn import ServerProcess

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA here: run with --smoke for the CPU version")
    shape = SMOKE if smoke else LLAMA3_8B
    block_bytes = shape.block_bytes(args.layout, args.tp)
    num_blocks = 96 if smoke else int(args.cache_gib * GIB // block_bytes)
    devices = (args.devices or ",".join(str(i) for i in range(args.tp))).split(",")
    if not smoke and len(devices) != args.tp:
        raise SystemExit(f"--devices names {len(devices)} GPUs for --tp {args.tp}")
    ttft = tuple(int(t) for t in (args.ttft_tokens or ("16,32" if smoke else "1024,4096,10240")).split(","))
    skip = set(filter(None, args.skip.split(",")))
    job_blocks = args.job_blocks or (8 if smoke else 512)
    instance = f"e2e-{args.layout}-tp{args.tp}"
    workload = WorkloadConfig(steps=args.steps or (60 if smoke else 250), seed=args.seed,
                              **(dict(families=3, family_blocks=12, max_unique=4, max_decode=3, max_new=3,
                                      max_active=8) if smoke else {}))
    pool = args.pool_size or ("512kb" if smoke else f"{24 * args.tp}gb")
    if "overhead" not in skip:
        # Its saves of each size are all made before their loads: more than the pool holds and
        # the first ones are evicted before they are loaded (those loads fail, recomputed).
        n, size = overhead_n(args, smoke), max(overhead_sizes(smoke))
        need = n * size * block_bytes * args.tp
        if need > parse_size(pool):
            raise SystemExit(f"--overhead-n {n}: the overhead phase saves {n} jobs of {size} blocks ({need} bytes) "
                             f"before loading them, more than the pool ({pool}); lower --overhead-n or raise --pool-size")
    log(f"{shape.name} {args.layout} tp={args.tp}: {num_blocks} blocks of {block_bytes} bytes per rank "
        f"({num_blocks * block_bytes / GIB:.2f} GiB), pool {pool}, {'CPU smoke' if smoke else 'GPU ' + ','.join(devices)}")
    extra = (("--staging-size", args.staging_size) if args.staging_size else ()) + (
        ("--save-path", args.save_path) if args.save_path else ()) + (
        ("--switch-interval", args.switch_interval) if args.switch_interval else ()) + (
        ("--spin-us", args.spin_us) if args.spin_us else ())
    server = ServerProcess(*extra, pool_size=pool, device="cpu" if smoke else ",".join(devices), client_timeout=60.0,
                           ready_timeout_s=180.0)
    log(f"server ready on {server.ipc}")
    workers = client = None
    try:
        configs = [WorkerConfig(rank=r, tp=args.tp, device="cpu" if smoke else f"cuda:{devices[r]}", shape=shape,
                                layout=args.layout, num_blocks=num_blocks, endpoint=server.ipc, instance_id=instance,
                                ttft_tokens=() if "ttft" in skip else ttft, smoke=smoke, seed=args.seed,
                                **connector_switches(args))
                   for r in range(args.tp)]
        workers = Workers(configs, args.timeout)
        log(f"workers ready: {[{k: v for k, v in r.items() if k != 'prefill'} for r in workers.ready]}")
        for r, ready in enumerate(workers.ready):
            if ready["prefill"]:
                log(f"rank {r} prefill ms: {ready['prefill']}")
        client = PegaClient(server.ipc, timeout_s=10.0, name="e2e-scheduler")
        results: dict[str, Any] = {"prefill": [r["prefill"] for r in workers.ready]}
        if "replay" not in skip:
            replay = Replay(workload, num_blocks, args.tp, client, instance)
            results["replay"] = run_replay(workers, replay, workload.steps)
            log(f"replay: {results['replay']}")
        results.update(figures(workers, args, smoke, job_blocks, ttft, skip, block_bytes, shape.block_size,
                               reset=lambda: client.reset(instance)))
        results["server_stats"] = client.stats()
    finally:
        if client is not None:
            client.close()
        if workers is not None:
            workers.close()
        code = server.stop()
        log(f"server stopped (exit {code})")
    rows = build_rows(results, shape.name, args.layout, args.tp, block_bytes)
    print_table(rows)
    lines = summarize(results, rows)
    for line in lines:
        print(line, flush=True)
    config = {"shape": shape.name, "layout": args.layout, "tp": args.tp, "num_blocks": num_blocks,
              "block_bytes": block_bytes, "pool": pool, "job_blocks": job_blocks, "inflight": args.inflight,
              "smoke": smoke, "cards": [r["card"] for r in workers.ready],
              **connector_switches(args)}
    write_json(args.json, "e2e", rows, {"setup": config, "summary": lines, "details": results})
    log("done")
    return {"rows": rows, "results": results, "summary": lines}


def overhead_sizes(smoke: bool) -> list[int]:
    """Blocks per job of the overhead phase: one block, and a 1K-token prompt (smoke: 4)."""
    return [1, 4] if smoke else [1, 64]


def overhead_n(args: argparse.Namespace, smoke: bool) -> int:
    return args.overhead_n or (5 if smoke else 100)


def figures(workers: Workers, args: argparse.Namespace, smoke: bool, job_blocks: int, ttft: tuple[int, ...],
            skip: set[str], block_bytes: int, block_size: int, reset: Any = None) -> dict[str, Any]:
    """The figure phases. ``reset()`` drops the instance's stored blocks (the server's reset op)."""
    out: dict[str, Any] = {}
    ceiling_bytes = (64 << 10) if smoke else GIB
    ttft_bytes = -(-max(ttft) // block_size) * block_bytes
    workers.call("prepare", {"job_blocks": job_blocks, "ceiling_bytes": ceiling_bytes, "ttft_bytes": ttft_bytes})
    out["ceilings"] = workers.call("ceilings", {})
    log(f"ceilings: {out['ceilings']}")
    if "bulk" not in skip:
        for mode in ("save", "load"):
            out[f"bulk_{mode}"] = workers.call("bulk", {"mode": mode, "rounds": args.rounds, "inflight": args.inflight})
            log(f"bulk {mode} done")
    if "bulk" not in skip:
        out["bulk_both"] = workers.call("bulk", {"mode": "both", "rounds": args.rounds, "inflight": args.inflight})
        log("bulk both done")
        # Once more after the bulk phases: the ratios take the higher of the two (the
        # two-direction ceiling moved by up to 10 % within one run on the lent hosts).
        out["ceilings_late"] = workers.call("ceilings", {})
        log(f"ceilings after the bulk phases: {out['ceilings_late']}")
    if "interference" not in skip and "bulk" not in skip:
        rounds = args.interference_rounds or (2 if smoke else 12)
        # Loads first (they read the bulk saves' blocks); the saves' churn then evicts those.
        for direction in ("load", "save"):
            arg = {"direction": direction, "rounds": rounds, "inflight": 2 if smoke else 4,
                   "job_blocks": min(job_blocks, 4 if smoke else args.interference_job_blocks), "matmul_n": 64 if smoke else 8192,
                   "target_ms": 5 if smoke else 200}
            res = out[f"interference_{direction}"] = workers.call("interference", arg)
            log(f"interference ({direction}s): ratios {[round(x, 3) for x in res[0]['ratios']]}, "
                f"GB/s {[round(x, 1) for x in res[0]['gbps']]}")
        if reset is not None:
            # With TP, ranks run different numbers of pump saves (they stop on time): one rank's
            # extra blocks stay WRITING until the write timeout and cannot be evicted. In the
            # smoke's small pool they left no room for the overhead phase's saves (its loads then
            # failed, 1 run in ~5 on the dev machine). The later phases save what they load.
            log(f"after the interference phase: {reset()} stored blocks dropped")
    if "overhead" not in skip:
        arg = {"sizes": overhead_sizes(smoke), "n": overhead_n(args, smoke)}
        out["overhead"] = workers.call("overhead", arg)
        log("overhead done")
    if "ttft" not in skip:
        out["ttft"] = workers.call("ttft", {"tokens": list(ttft), "repeat": 3 if smoke else 7})
        log("ttft loads done")
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
