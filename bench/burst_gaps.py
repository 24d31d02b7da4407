"""Where a burst of engine transfers loses time against its copies (diagnostic, GPU only).

The bursts of ``bench/engine.py`` (512 blocks a transfer, at least 1 GiB a burst, staged), with
every DMA of the GPU lane wrapped by two timing events on its stream. Per burst: when the
first copy starts after the first call, how long the copy engine idles between copies, the
copies' own rate while they run, and how long the last handle takes to complete after the
last copy ends. The first piece's booking and launch are timed on the host
from the same origin. The rates stand beside one contiguous pinned copy of one transfer's bytes,
measured in the same run; medians over the bursts.

    python bench/burst_gaps.py --json bench/results/burst_gaps-h100.json
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

from common import Row, arg_parser, print_table, write_json  # noqa: E402

GIB = 1 << 30


def copy_gaps(copies: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(first start, idle time between copies, last end) of ``copies`` given as (start, end)
    pairs in any order; copies on several streams may overlap, and idle counts only the time
    when none runs."""
    if not copies:
        raise ValueError("no copies")
    spans = sorted(copies)
    idle, end = 0.0, spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            idle += start - end
        end = max(end, stop)
    return spans[0][0], idle, end


class DmaClock:
    """Wraps a GpuLane's DMA function (two timing events around each copy on its stream) and
    its submit (host times around each job's submission: booking ends where it is called)."""

    def __init__(self, lane) -> None:
        self.streams = {p.dma.cuda_stream: p.dma for p in lane._paths.values()}
        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self.submits: list[tuple[float, float]] = []
        self._dma, self._submit = lane._dma, lane.submit
        lane._dma, lane.submit = self, self.submit

    def submit(self, job) -> None:
        start = time.perf_counter()
        self._submit(job)
        self.submits.append((start, time.perf_counter()))

    def __call__(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        s = self.streams[stream]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(s)
        self._dma(dst, src, nbytes, stream)
        end.record(s)
        self.marks.append((start, end, nbytes))


def one_burst(case, make, count: int, clock: DmaClock) -> dict[str, float]:
    """Times in microseconds from the first call (a CUDA event recorded on an idle stream just
    before it, so GPU and host times share an origin)."""
    case.keep_held()
    torch.cuda.synchronize()
    clock.marks.clear()
    clock.submits.clear()
    calls = [make() for _ in range(count)]
    origin = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    origin.record(torch.cuda.current_stream())
    handles = [fn() for fn in calls]
    results = [h.wait(120) for h in handles]
    wall_us = (time.perf_counter() - t0) * 1e6
    bad = [r for r in results if not r.ok or r.skipped]
    if bad:
        raise RuntimeError(f"{case.name}: a transfer failed or was skipped: {bad[0]}")
    torch.cuda.synchronize()
    spans = [(origin.elapsed_time(a) * 1e3, origin.elapsed_time(b) * 1e3) for a, b, _ in clock.marks]
    first, idle, last = copy_gaps(spans)
    nbytes = sum(n for _, _, n in clock.marks)
    submit_start, submit_end = clock.submits[0]
    return {"first_submit_us": (submit_start - t0) * 1e6, "first_launch_us": (submit_end - submit_start) * 1e6,
            "first_copy_us": first, "idle_us": idle, "tail_us": wall_us - last, "copies_gbps": nbytes / (last - first) / 1e3,
            "wall_gbps": count * case.nbytes / wall_us / 1e3, "copies": len(spans)}


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="llama3-8b,llama3-70b-tp8,qwen2.5-7b")
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--bursts", type=int, default=5, help="per config and direction (the first warms up)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/burst_gaps.py times the GPU lane's copies: it needs a CUDA device")
    import engine as engine_bench

    from pegaflow.engine import Engine, EngineConfig, heap

    names = [n for n in args.configs.split(",") if n]
    per_job = {n: args.blocks * engine_bench.CONFIGS[n].block_bytes for n in names}
    burst = {n: max(2, math.ceil(GIB / per_job[n])) for n in names}
    pool_bytes = sum(per_job.values()) + 3 * max(burst[n] * per_job[n] for n in names)
    engine = Engine(EngineConfig(pool_bytes=pool_bytes, devices=(0,), pin_threads=os.cpu_count() or 1))
    ceilings = engine_bench.Ceilings(max(per_job.values()))
    rows: list[Row] = []
    try:
        cases = [engine_bench.Case(engine, n, args.blocks, 4 * GIB, seed=i) for i, n in enumerate(names)]
        heap.settle()
        clock = DmaClock(engine._lanes[0])
        for case in cases:
            for direction, make in (("save", case.save), ("load", case.load)):
                ceiling = ceilings.one_way(case.nbytes, direction == "save", 5)
                runs = [one_burst(case, make, burst[case.name], clock) for _ in range(args.bursts)][1:]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                note = f"{burst[case.name]} transfers of {args.blocks} blocks, {int(med['copies'])} copies a burst"
                rows += [
                    Row(case.name, direction, "first-piece-booked-us", True, round(med["first_submit_us"], 1), "us",
                        note="from the first call to the first piece's submit to the lane"),
                    Row(case.name, direction, "first-piece-launch-us", True, round(med["first_launch_us"], 1), "us",
                        note="host time of that submit (inline launch)"),
                    Row(case.name, direction, "first-copy-start-us", True, round(med["first_copy_us"], 1), "us", note=note),
                    Row(case.name, direction, "idle-between-copies-us", True, round(med["idle_us"], 1), "us"),
                    Row(case.name, direction, "last-copy-to-done-us", True, round(med["tail_us"], 1), "us"),
                    Row(case.name, direction, "copies-while-running", True, round(med["copies_gbps"], 2), "GB/s",
                        ceiling=round(ceiling, 2)),
                    Row(case.name, direction, "burst-wall-clock", True, round(med["wall_gbps"], 2), "GB/s",
                        ceiling=round(ceiling, 2)),
                    Row(case.name, direction, "ceiling-contiguous-copy", False, round(ceiling, 2), "GB/s"),
                ]
    finally:
        ceilings.close()
        engine.close()
    print_table(rows)
    write_json(args.json, "burst_gaps", rows)


if __name__ == "__main__":
    main()
