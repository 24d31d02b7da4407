"""Pool start-up: mmap + parallel first touch + cudaHostRegister against torch's pinned
allocator (``torch.empty(n, dtype=uint8, pin_memory=True)``), same sizes, same run.

Each pool is freed before the next is made. Ours runs twice per size (before and after
torch's, so neither gets a warmer page allocator); its slower run is reported.
Target (issue 3): >= 5x faster than torch's.

    python bench/pool.py --json bench/results/pool-h200.json
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402

from pegaflow.engine import parse_size  # noqa: E402
from pegaflow.engine.pool import PinnedPool  # noqa: E402

GIB = 1 << 30


def ours(nbytes: int, threads: int) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    pool = PinnedPool(nbytes, pin=True, threads=threads)
    elapsed = time.perf_counter() - start
    assert pool.tensor.is_pinned()
    timings = dict(pool.timings)
    pool.close()
    del pool
    gc.collect()
    return elapsed, timings


def torch_pinned(nbytes: int) -> float:
    start = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    elapsed = time.perf_counter() - start
    assert t.is_pinned()
    del t
    gc.collect()
    torch._C._host_emptyCache()  # give the pinned block back to the OS before the next run
    return elapsed


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8gb,32gb")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: pinning cannot be measured here")
        return
    torch.cuda.init()
    torch.empty(1, device="cuda")  # context creation is not part of either start-up
    rows = []
    for text in args.sizes.split(","):
        nbytes = parse_size(text)
        first, timings = ours(nbytes, args.threads)
        baseline = torch_pinned(nbytes)
        second, timings2 = ours(nbytes, args.threads)
        worst, worst_timings = (first, timings) if first >= second else (second, timings2)
        speedup = baseline / worst
        print(f"{text}: ours {first:.2f} s / {second:.2f} s {worst_timings}, torch {baseline:.2f} s: {speedup:.1f}x", flush=True)
        note = ", ".join(f"{k} {v:.2f}" for k, v in worst_timings.items()) + f"; {args.threads} threads"
        rows.append(Row(text, "startup", "pegaflow-pool (ratio = torch s / ours s)", True, worst, "s",
                        ratio=round(speedup, 2), note=note))  # fmt: skip
        rows.append(Row(text, "startup", "torch pin_memory=True", False, baseline, "s", ratio=1.0))
    print_table(rows)
    write_json(args.json, "pool", rows)


if __name__ == "__main__":
    main()
