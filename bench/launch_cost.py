"""Host cost of one staged chunk's kernel launch: through JITFunction.run against the kept
CompiledKernel launched directly (``triton_copy.FAST_LAUNCH``), GPU only.

Per direction (a gather into staging, a scatter from it), Llama-3-8B blocks (LBNHC, 2 MiB),
``launch_rows`` of 32 blocks on a side stream: the host time of the call, median and p90 over
``--repeat`` calls taken in alternating rounds of the two paths, so drift between rounds falls
on both. Each path first copies the same rows into its own buffer (or from the same buffer
into its own copy of the cache), and the two results must agree bit for bit; verification
(``VERIFY_LAUNCH``) is off while timing. The row's ratio is the direct launch's time over
the JIT's (lower is better).

    python bench/launch_cost.py --json bench/results/launch_cost-h100.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402
from gather_scatter import CONFIGS  # noqa: E402

from pegaflow.kernels import triton_copy  # noqa: E402
from pegaflow.kernels.regions import _storage_bytes_view  # noqa: E402

ROWS = 32


def host_times(call, fast: bool, count: int) -> list[float]:
    """Microseconds of host time per call, with the GPU queue kept short."""
    triton_copy.FAST_LAUNCH = fast
    times = []
    for i in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
        if i % 16 == 15:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return times


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama3-8b")
    parser.add_argument("--repeat", type=int, default=400, help="calls per path and direction")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/launch_cost.py times kernel launches: it needs a CUDA device")
    default_fast = triton_copy.FAST_LAUNCH
    triton_copy.VERIFY_LAUNCH = False
    cache = CONFIGS[args.config].build(4 * ROWS, "cuda")
    kv = cache.regions
    raw = _storage_bytes_view(kv.regions[0].owner)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device="cuda"))
    pitch = kv.block_bytes
    stream = torch.cuda.Stream()
    ids = torch.randperm(kv.num_blocks)[:ROWS].tolist()
    rows: list[Row] = []
    with torch.cuda.stream(stream):
        for direction, to_kv in (("gather", False), ("scatter", True)):
            table = triton_copy.block_table(kv, ids, pitch, to_kv=to_kv)
            if to_kv:
                source = torch.randint(0, 256, (ROWS * pitch,), dtype=torch.uint8, device="cuda")
                results = {}
                before = raw.clone()
                for fast in (False, True, True):  # the first direct call compiles or finds the variant
                    raw.copy_(before)
                    triton_copy.FAST_LAUNCH = fast
                    triton_copy.launch_rows(table, 0, ROWS, source)
                    results[fast] = raw.clone()
                same = torch.equal(results[False], results[True]) and not torch.equal(results[True], before)
                buffer = source
            else:
                buffers = {fast: torch.empty(ROWS * pitch, dtype=torch.uint8, device="cuda") for fast in (False, True)}
                for fast in (False, True, True):
                    triton_copy.FAST_LAUNCH = fast
                    triton_copy.launch_rows(table, 0, ROWS, buffers[fast])
                same = torch.equal(buffers[False], buffers[True])
                buffer = buffers[True]
            torch.cuda.synchronize()
            if not same:
                sys.exit(f"{direction}: the direct launch's bytes differ from the JIT's")
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(8):  # alternating rounds
                for fast in (False, True):
                    times[fast] += host_times(lambda: triton_copy.launch_rows(table, 0, ROWS, buffer), fast,
                                              args.repeat // 8)
            p50 = {fast: statistics.median(t) for fast, t in times.items()}
            p90 = {fast: sorted(t)[int(0.9 * len(t))] for fast, t in times.items()}
            note = f"launch_rows of {ROWS} blocks of {kv.block_bytes} B, host time; bit-exact against the JIT path"
            rows += [
                Row(args.config, direction, "launch-jit-p50", False, round(p50[False], 1), "us", note=note),
                Row(args.config, direction, "launch-direct-p50", True, round(p50[True], 1), "us",
                    ceiling=round(p50[False], 1), note="ratio: direct over JIT (lower is better)"),
                Row(args.config, direction, "launch-jit-p90", False, round(p90[False], 1), "us"),
                Row(args.config, direction, "launch-direct-p90", True, round(p90[True], 1), "us",
                    ceiling=round(p90[False], 1)),
            ]
    triton_copy.FAST_LAUNCH = default_fast
    print_table(rows)
    write_json(args.json, "launch_cost", rows, {"variants_kept": len(triton_copy._compiled)})


if __name__ == "__main__":
    main()
