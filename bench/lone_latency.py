"""Lone transfers through the Engine API on one GPU: where their latency goes (diagnostic).

A lone transfer is one that finds its path idle, as a repeated prompt's load usually does;
its latency, not the bulk rate, is what a request waits for (the end-to-end overhead and TTFT
figures of issue 6). Llama-3-8B blocks (LBNHC, 2 MiB), the server's save path (``auto``), loads
and saves of 1 / 64 / 256 / 640 blocks (one 16-token block, then 1K / 4K / 10K-token prompts),
each after an idle gap, so the GPU and the threads start cold as they do between requests.

Per transfer: the wall time from the call to its completion callback (on the completer
thread; no waiter's wake-up), the GPU span (an event on the path's stream before the call to
the job's end event) and their difference, the host's share. Beside them, in the same run and
after the same gap: one contiguous pinned copy of the same bytes (its GPU time; the row's
ratio is that over our wall time). The lane's completion waits are compared in turns:

- ``block``: jobs over ``SPIN_MAX_BYTES`` block on their event (the lane before e10ae07);
- ``late``:  lone long jobs block until their last piece, then spin (``transfer.LATE_SPIN``);
- ``spin``:  every event spins (a bound for ``late``: no wake-up, a core held throughout);
- ``sync``:  ``late``, and jobs up to 4 MiB complete on the caller's thread (``SYNC_MAX_BYTES``;
  the default since e10ae07).

    python bench/lone_latency.py --json bench/results/lone_latency-h100.json
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402
from gather_scatter import CONFIGS  # noqa: E402

from pegaflow.engine import Engine, EngineConfig, InstanceSpec, heap  # noqa: E402
from pegaflow.engine import transfer  # noqa: E402
from pegaflow.engine.transfer import LOAD, SAVE  # noqa: E402

VARIANTS = ("block", "late", "spin", "sync")


def _set_variant(lane: transfer.GpuLane, variant: str) -> None:
    lane._late_spin = variant != "block"
    lane._sync_max_bytes = (4 << 20) if variant == "sync" else 0
    spin_all = variant == "spin"
    lane.new_event = lambda nbytes=1 << 62: torch.cuda.Event(
        enable_timing=True, blocking=not spin_all and nbytes > transfer.SPIN_MAX_BYTES)


def copy_us(host: torch.Tensor, dev: torch.Tensor, nbytes: int, load: bool, gap_s: float, repeat: int) -> float:
    """Median GPU microseconds of one contiguous copy of ``nbytes`` after ``gap_s`` idle."""
    stream = torch.cuda.Stream()
    times = []
    for _ in range(repeat):
        time.sleep(gap_s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record(stream)
            if load:
                dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
            else:
                host[:nbytes].copy_(dev[:nbytes], non_blocking=True)
            b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,64,256,640", help="blocks per transfer")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="idle time before each transfer")
    parser.add_argument("--repeat", type=int, default=12, help="timed transfers per variant, size and direction")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the variants (medians over all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("lone_latency: needs a CUDA GPU (it times the GPU lane)")
    sizes = [int(s) for s in args.sizes.split(",")]
    gap = args.gap_ms / 1e3
    cfg = CONFIGS["llama3-8b"]
    num_blocks = 2 * max(sizes) + 64
    cache = cfg.build(num_blocks, "cuda")
    engine = Engine(EngineConfig(pool_bytes=(3 * max(sizes) + 64) * cache.regions.block_bytes, devices=(0,),
                                 save_mode="auto"))
    rows: list[Row] = []
    try:
        spec = InstanceSpec("lone", "lone", str(cfg.dtype), cfg.layout, cfg.block_size,
                            tuple(r.page_bytes for r in cache.regions.regions))
        engine.register_instance(spec)
        engine.register_kv("lone", 0, cache.regions)
        lane = engine._lanes[0]
        heap.settle()  # as the server runs
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        src, dst = perm[: max(sizes)], perm[max(sizes) : 2 * max(sizes)]
        counter = [0]

        def fresh(k: int) -> list[bytes]:
            counter[0] += 1
            return [f"{counter[0]}/{i}".encode().ljust(32, b"\0") for i in range(k)]

        block = cache.regions.block_bytes
        top = max(sizes) * block
        host = torch.empty(top, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(top, dtype=torch.uint8, device="cuda")
        samples: dict[tuple, dict[str, list[float]]] = {}
        time.sleep(2)  # the lane compiles its kernels in the background at registration
        for _ in range(args.rounds):
            for variant in VARIANTS:
                _set_variant(lane, variant)
                for k in sizes:
                    held = fresh(k)
                    assert engine.save("lone", 0, src[:k], held).wait(60).ok
                    for direction in (LOAD, SAVE):
                        path = lane._paths[direction]
                        got = samples.setdefault((variant, k, direction), {"wall": [], "gpu": []})
                        for i in range(args.repeat + 2):
                            time.sleep(gap)
                            start = torch.cuda.Event(enable_timing=True)
                            start.record(path.dma)
                            stamp: list[float] = []
                            t0 = time.perf_counter()
                            if direction == LOAD:
                                handle = engine.load("lone", 0, dst[:k], held)
                            else:
                                handle = engine.save("lone", 0, src[:k], fresh(k))
                            done = threading.Event()  # set after the stamp (wait() may return before callbacks run)
                            handle.add_done_callback(lambda r, stamp=stamp, done=done: (stamp.append(time.perf_counter()),
                                                                                      done.set()))
                            if not done.wait(60):
                                raise RuntimeError(f"{variant} {direction} of {k} blocks: no completion in 60 s")
                            result = handle.wait(0)
                            if not result.ok:
                                raise RuntimeError(f"{variant} {direction} of {k} blocks failed: {result}")
                            if i >= 2:  # the first two warm the variant's path
                                got["wall"].append((stamp[0] - t0) * 1e6)
                                got["gpu"].append(start.elapsed_time(handle.event) * 1e3)
        for k in sizes:
            for direction in (LOAD, SAVE):
                copy = copy_us(host, dev, k * block, direction == LOAD, gap, args.repeat)
                hot = copy_us(host, dev, k * block, direction == LOAD, 0.0, args.repeat)
                config = f"8b-{k}blk"
                rows.append(Row(config, direction, f"contiguous copy after {args.gap_ms:g} ms", False, round(copy, 1), "us",
                                note=f"back to back: {hot:.1f} us"))
                for variant in VARIANTS:
                    got = samples[(variant, k, direction)]
                    wall, gpu = statistics.median(got["wall"]), statistics.median(got["gpu"])
                    host_share = statistics.median([w - g for w, g in zip(got["wall"], got["gpu"])])
                    rows.append(Row(config, direction, f"{variant}: call->done", True, round(wall, 1), "us",
                                    ceiling=round(copy, 1), ratio=round(copy / wall, 3),
                                    note=f"GPU span {gpu:.1f} us, host beyond it {host_share:.1f} us"))
    finally:
        engine.close()
    print_table(rows)
    for r in rows:
        if r.note:
            print(f"  {r.config} {r.direction} {r.method}: {r.note}")
    write_json(args.json, "lone_latency", rows, {"setup": {"sizes": sizes, "gap_ms": args.gap_ms, "repeat": args.repeat,
                                                           "rounds": args.rounds, "block_bytes": block}})


if __name__ == "__main__":
    main()
