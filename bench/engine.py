"""Saves and loads through the Engine API against the copy ceilings of the same run.

For each config (the kernel benchmark's: ``bench/gather_scatter.py``), 512 scattered blocks per
save and per load, through ``Engine.save`` / ``Engine.load`` (validation, index, eviction,
staging or zero-copy, completion threads: everything the server runs), timed by the wall clock
from the first call to the last handle's completion over bursts of transfers. Ceilings, in the
same run and on the same card: one contiguous copy of the same bytes between GPU memory and
pinned memory each way, and both directions at once on two streams.

Rows: save and load GB/s (target >= 0.93 of the one-way ceiling), save+load at once (target
>= 0.85 of the two-direction ceiling), for ``staged``, ``dma`` (saves by the copy engines
alone) and ``zero_copy``; then a sweep of the
staging size (the default's justification). The ceilings are measured before each mode's
runs and at the end; every ratio is against the highest of those medians.

    python bench/engine.py --json bench/results/engine-h200.json
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import Row, arg_parser, cuda_time_ms, gbps, print_table, write_json  # noqa: E402
from gather_scatter import CONFIGS  # noqa: E402

from pegaflow.engine import Engine, EngineConfig, InstanceSpec, heap  # noqa: E402
from pegaflow.engine.config import DEFAULT_STAGING_BYTES  # noqa: E402
from pegaflow.engine.pool import PinnedPool  # noqa: E402
from pegaflow.engine import transfer  # noqa: E402
from pegaflow.engine.transfer import GpuLane  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20
CUDA = torch.cuda.is_available()
DEFAULT_CONFIGS = "llama3-8b,llama3-70b-tp8,qwen2.5-7b,deepseek-v3-mla"


def log(message: str) -> None:
    print(message, flush=True)


class Case:
    """One config's KV cache registered with the engine, its block ids and hashes."""

    def __init__(self, engine: Engine, name: str, blocks: int, cache_bytes: int, seed: int) -> None:
        self.config = CONFIGS[name]
        self.name = name
        num_blocks = max(2 * blocks, math.ceil(cache_bytes / self.config.block_bytes))
        self.cache = self.config.build(num_blocks, "cuda" if CUDA else "cpu", scale=not CUDA)
        self.engine = engine
        self.spec = InstanceSpec(
            name, name, str(self.config.dtype), self.config.layout, self.config.block_size,
            tuple(r.page_bytes for r in self.cache.regions.regions),
        )  # fmt: skip
        engine.register_instance(self.spec)
        engine.register_kv(name, 0, self.cache.regions)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        self.save_ids = perm[:blocks]  # scattered, disjoint from the load targets
        self.load_ids = perm[blocks : 2 * blocks]
        self.nbytes = blocks * self.spec.block_bytes
        self._counter = 0
        self.held = self.fresh_hashes()
        assert engine.save(name, 0, self.save_ids, self.held).wait(120).ok

    def fresh_hashes(self) -> list[bytes]:
        """Hashes never saved before: a save of them always copies."""
        self._counter += 1
        prefix = f"{self.name}/{self._counter}/".encode()
        return [(prefix + str(i).encode()).ljust(32, b"\0")[:32] for i in range(len(self.save_ids))]

    def keep_held(self) -> None:
        if self.engine.query(self.name, self.held) != len(self.held):
            self.held = self.fresh_hashes()
            assert self.engine.save(self.name, 0, self.save_ids, self.held).wait(120).ok

    # Each returns the call to time, its arguments made beforehand: making 512 hashes is the
    # caller's work (vLLM has them already), not the engine's.

    def save(self):
        hashes = self.fresh_hashes()
        return lambda: self.engine.save(self.name, 0, self.save_ids, hashes)

    def load(self):
        return lambda: self.engine.load(self.name, 0, self.load_ids, self.held)


# Per burst kind, what the wall-clock rate hides: time to submit everything, and the rate
# between the first and the last completion (the pipeline once full: no fill, no drain).
DIAGNOSTICS: dict[str, dict[str, float]] = {}


def burst_gbps(case: Case, submit, count: int, repeat: int, label: str = "") -> float:
    """GB/s of ``count`` transfers submitted back to back, wall clock to the last completion."""
    rates, submits, steady = [], [], []
    for i in range(repeat + 1):  # the first round warms up
        case.keep_held()
        if CUDA:
            torch.cuda.synchronize()
        calls = [make() for _ in range(count) for make in submit]
        done: list[float] = []
        start = time.perf_counter()
        handles = [fn() for fn in calls]
        submitted = time.perf_counter()
        for h in handles:
            h.add_done_callback(lambda _, done=done: done.append(time.perf_counter()))
        results = [h.wait(120) for h in handles]
        elapsed = time.perf_counter() - start
        bad = [r for r in results if not r.ok or r.skipped]
        assert not bad, f"{case.name}: transfer failed or skipped: {bad[0]}"
        if i:
            rates.append(gbps(len(calls) * case.nbytes, elapsed * 1e3))
            submits.append((submitted - start) * 1e3)
            done.sort()
            if len(done) > 1 and done[-1] > done[0]:
                steady.append(gbps((len(calls) - 1) * case.nbytes, (done[-1] - done[0]) * 1e3))
    if label:
        DIAGNOSTICS[label] = {"wall_gbps": round(statistics.median(rates), 2),
                              "submit_ms": round(statistics.median(submits), 2),
                              "first_to_last_done_gbps": round(statistics.median(steady), 2) if steady else 0.0}
    return statistics.median(rates)


class Ceilings:
    """Contiguous copies between GPU memory and pinned memory of our own pool kind."""

    def __init__(self, nbytes: int) -> None:
        self.host = PinnedPool(2 * nbytes, pin=True, threads=os.cpu_count() or 1)
        self.gpu = torch.empty(2 * nbytes, dtype=torch.uint8, device="cuda")
        self.streams = (torch.cuda.Stream(), torch.cuda.Stream())

    def one_way(self, nbytes: int, save: bool, repeat: int) -> float:
        host, gpu = self.host.tensor[:nbytes], self.gpu[:nbytes]
        copy = (lambda: host.copy_(gpu, non_blocking=True)) if save else (lambda: gpu.copy_(host, non_blocking=True))
        return self._timed(lambda: copy(), nbytes, repeat)

    def both(self, nbytes: int, repeat: int) -> float:
        s1, s2 = self.streams
        h = self.host.tensor
        g = self.gpu

        def run() -> None:
            current = torch.cuda.current_stream()
            s1.wait_stream(current)
            s2.wait_stream(current)
            with torch.cuda.stream(s1):
                h[:nbytes].copy_(g[:nbytes], non_blocking=True)
            with torch.cuda.stream(s2):
                g[nbytes : 2 * nbytes].copy_(h[nbytes : 2 * nbytes], non_blocking=True)
            current.wait_stream(s1)
            current.wait_stream(s2)

        return self._timed(run, 2 * nbytes, repeat)

    @staticmethod
    def _timed(fn, nbytes: int, repeat: int) -> float:
        return gbps(nbytes, cuda_time_ms(fn, warmup=1, repeat=repeat))

    def close(self) -> None:
        del self.gpu
        self.host.close()


def use_lane(engine: Engine, cases: list[Case], staging_bytes: int, mode: str) -> None:
    """Swap the device's lane for one with another staging size or mode, keeping the pool
    (pinning it again per variant would cost more than the whole measurement)."""
    if not CUDA:
        return  # the smoke run has one CPU lane
    engine._lanes[0].close()
    engine._lanes[0] = GpuLane(0, engine.pool.tensor, staging_bytes, mode == "zero_copy",
                               dma_min_row=0 if mode == "dma" else None)
    for case in cases:
        engine.register_kv(case.name, 0, case.cache.regions)


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--blocks", type=int, default=512, help="blocks per save and per load")
    parser.add_argument("--cache-gib", type=float, default=4.0, help="least KV cache size per config")
    parser.add_argument("--burst-gib", type=float, default=1.0, help="least bytes per timed burst, each way")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--head-chunks", type=int, default=None,
                        help="override transfer.HEAD_CHUNKS (staging chunks of a transfer's first piece on an idle path)")
    parser.add_argument("--tail-chunks", type=int, default=None,
                        help="override transfer.TAIL_CHUNKS (staging chunks of a transfer's last piece)")
    parser.add_argument("--staging-mib", type=int, default=DEFAULT_STAGING_BYTES >> 20,
                        help="GPU staging per direction for the modes' rows (the sweep sets its own)")
    parser.add_argument("--modes", default="staged,dma,zero_copy",
                        help="save modes to measure (dma: saves by the copy engines alone, loads staged)")
    parser.add_argument("--sweep", default="4,8,16,32,64,128", help="staging MiB to sweep ('' to skip)")
    parser.add_argument("--sweep-configs", default="llama3-8b,llama3-70b-tp8")
    parser.add_argument("--index", choices=("compiled", "dicts"), default="compiled",
                        help="the index's queries through numba-compiled sets (when numba imports) or dicts")
    args = parser.parse_args()
    if not CUDA:
        log("no CUDA device: a tiny smoke run through the CPU engine; it measures NOTHING")
        args.blocks, args.cache_gib, args.burst_gib, args.repeat = 8, 0.0, 0.0, 1

    if args.head_chunks is not None:
        transfer.HEAD_CHUNKS = args.head_chunks
    if args.tail_chunks is not None:
        transfer.TAIL_CHUNKS = args.tail_chunks
    names = [n for n in args.configs.split(",") if n]
    transfer_max = max(args.blocks * CONFIGS[n].block_bytes for n in names)
    burst = {n: max(2, math.ceil(args.burst_gib * GIB / (args.blocks * CONFIGS[n].block_bytes))) for n in names}
    # Room for one held set per config plus a save burst (and the both-ways burst) of the largest.
    pool_bytes = sum(args.blocks * CONFIGS[n].block_bytes for n in names) + 3 * max(
        burst[n] * args.blocks * CONFIGS[n].block_bytes for n in names
    )
    t0 = time.perf_counter()
    devices = (0,) if CUDA else ()
    engine = Engine(EngineConfig(pool_bytes=pool_bytes, devices=devices, pin_threads=os.cpu_count() or 1,
                                 compiled_index=args.index == "compiled"))
    log(f"index: {'compiled (numba)' if engine.index.compiled else 'dicts'}")
    log(f"engine pool {pool_bytes / GIB:.1f} GiB pinned in {time.perf_counter() - t0:.1f} s ({engine.pool.timings})")
    ceilings = Ceilings(transfer_max) if CUDA else None
    cases = [Case(engine, n, args.blocks, int(args.cache_gib * GIB), seed=i) for i, n in enumerate(names)]
    heap.settle()  # as the server runs: no full collections over torch's objects mid-burst
    rows: list[Row] = []

    # Each config's ceilings are measured before each mode's runs and once at the end; every
    # ratio is taken against the highest of those medians. One measurement up front read a
    # two-direction ceiling 10 % under the others of a run once (H100, 2026-11-28), which
    # flattered that config's ratios.
    ceiling_runs: dict[str, dict[str, list[float]]] = {c.name: {"save": [], "load": [], "both": []} for c in cases}

    def measure_ceilings(case: Case) -> None:
        runs, n = ceiling_runs[case.name], case.nbytes
        runs["save"].append(ceilings.one_way(n, True, args.repeat) if ceilings else 0.0)
        runs["load"].append(ceilings.one_way(n, False, args.repeat) if ceilings else 0.0)
        runs["both"].append(ceilings.both(n, args.repeat) if ceilings else 0.0)

    results: list[tuple[Case, str, str, float, str]] = []
    for mode in [m for m in args.modes.split(",") if m]:
        use_lane(engine, cases, args.staging_mib * MIB, mode)
        for case in cases:
            measure_ceilings(case)
            k = burst[case.name]
            save = burst_gbps(case, [case.save], k, args.repeat, f"{case.name}/{mode}/save")
            load = burst_gbps(case, [case.load], k, args.repeat, f"{case.name}/{mode}/load")
            both = burst_gbps(case, [case.save, case.load], k, args.repeat, f"{case.name}/{mode}/both")
            note = f"{args.blocks} blocks of {case.spec.block_bytes} B, bursts of {k}"
            results += [(case, d, f"engine-{mode}", v, note) for d, v in (("save", save), ("load", load), ("both", both))]
            log(f"{case.name} {mode}: save {save:.1f} load {load:.1f} both {both:.1f} GB/s")
    for case in cases:
        measure_ceilings(case)
    ceiling = {name: {d: max(v) for d, v in runs.items()} for name, runs in ceiling_runs.items()}
    for case in cases:
        for d in ("save", "load", "both"):
            method = {"save": "contiguous D2H copy", "load": "contiguous H2D copy", "both": "both at once, 2 streams"}[d]
            spread = ", ".join(f"{v:.1f}" for v in ceiling_runs[case.name][d])
            rows.append(Row(case.name, d, method, False, ceiling[case.name][d], "GB/s", ceiling[case.name][d],
                            note=f"highest of {spread}"))
    for case, d, method, value, note in results:
        rows.append(Row(case.name, d, method, True, value, "GB/s", ceiling[case.name][d], note=note))

    sweep_names = [n for n in args.sweep_configs.split(",") if n in names]
    for mib in [int(m) for m in args.sweep.split(",") if m]:
        use_lane(engine, cases, mib * MIB, False)
        for case in (c for c in cases if c.name in sweep_names):
            k = burst[case.name]
            for direction, fn in (("save", case.save), ("load", case.load)):
                value = burst_gbps(case, [fn], k, args.repeat)
                c = ceiling[case.name][direction]
                default = " (default)" if mib * MIB == DEFAULT_STAGING_BYTES else ""
                rows.append(Row(case.name, direction, f"staging-{mib}MiB{default}", True, value, "GB/s", c))

    engine.close()
    if ceilings:
        ceilings.close()
    print_table(rows)
    for label, diag in DIAGNOSTICS.items():
        log(f"{label}: {diag}")
    write_json(args.json, "engine", rows, {"index": "compiled" if engine.index.compiled else "dicts",
                                           "stats": {k: v for k, v in engine.stats().items()},
                                           "burst_diagnostics": DIAGNOSTICS})


if __name__ == "__main__":
    main()
