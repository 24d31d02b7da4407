"""Where a lone request's time goes, step by step, through the real server (diagnostic).

The server runs with stamps patched in at start-up (``bench/timeline_site/sitecustomize.py``:
the loop's receive and sends, the deferred start, the engine call, the GPU lane's launch and
completion wait, the completion callback); the client here is the connector's worker side (as
in bench/e2e.py; it sends transfers without waiting for an acceptance, which the server
then does not send, unless ``--wait``) on a Llama-3-8B LBNHC cache. Saves, then loads, of 1 and 64 blocks, one at a
time, each after an idle gap (as a request finds the server). Both processes stamp
CLOCK_MONOTONIC, so the steps line up; medians in microseconds.

    python bench/request_timeline.py --json bench/results/request_timeline-h100.json
    python bench/request_timeline.py --cpu --n 3   # the flow on the CPU (measures nothing)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402
from e2e_worker import Rank, WorkerConfig, add_connector_switches, connector_switches  # noqa: E402

# (label, from stamp, to stamp): "t0" / "call" / "end" are the client's call start, the
# call's return and the completion's arrival; "x:last" is the last stamp x within the request.
STEPS = (
    ("call -> server has the message", "t0", "serve0"),
    ("message -> reply sends", "serve0", "reply"),  # --wait only
    ("call returns", "t0", "call"),
    ("message -> engine call", "serve0", "engine0"),
    ("engine call -> launch (booking)", "engine0", "launch0"),
    ("launch (enqueue the copies)", "launch0", "launch1"),
    ("copy wait", "complete0", "complete1"),
    ("completion -> push sends", "done0", "push:last"),
    ("push sends -> client has it", "push:last", "end"),
    ("total", "t0", "end"),
)


def main() -> None:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU server and cache: checks the flow only")
    p.add_argument("--n", type=int, default=40, help="requests per size and direction")
    p.add_argument("--sizes", default="1,64")
    p.add_argument("--gap-ms", type=float, default=2.0)
    add_connector_switches(p)
    args = p.parse_args()
    from e2e_shapes import LLAMA3_8B

    from pegaflow.server.spawn import ServerProcess

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        stamp_file = os.path.join(tmp, "stamps.json")
        env = {"PEGA_TIMELINE": stamp_file,
               "PYTHONPATH": os.pathsep.join([str(_ROOT / "bench" / "timeline_site"), str(_ROOT),
                                              os.environ.get("PYTHONPATH", "")])}
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the server process inherits them; this one is already running
        try:
            # Every save of a size is made before its loads: the pool holds them all, and half again.
            pool_mb = max(64, 3 * args.n * max(sizes) * LLAMA3_8B.block_bytes("LBNHC", 1) // (2 << 20))
            server = ServerProcess(pool_size=f"{pool_mb}mb", device="cpu" if args.cpu else "0",
                                   client_timeout=60.0, ready_timeout_s=180.0)
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        marks = []  # (direction, blocks, t0, call, end)
        try:
            device = "cpu" if args.cpu else "cuda:0"
            cfg = WorkerConfig(rank=0, tp=1, device=device, shape=LLAMA3_8B, layout="LBNHC",
                               num_blocks=2 * max(sizes) if args.cpu else max(256, 2 * max(sizes)), endpoint=server.ipc, instance_id="timeline",
                               **connector_switches(args))
            rank = Rank(cfg)
            ids = list(range(cfg.num_blocks))
            rank.write(ids, [i + 1 for i in ids])
            rank.sync()
            clock, gap = time.monotonic_ns, args.gap_ms / 1e3
            for k in sizes:
                src, dst = ids[:k], ids[cfg.num_blocks // 2 : cfg.num_blocks // 2 + k]
                saved = []
                for _ in range(args.n):
                    hashes = rank.fresh_hashes(k)
                    for b, h in zip(src, hashes):
                        rank.known[h] = rank.held[b]
                    time.sleep(gap)
                    *times, ok = _timed(rank, lambda: rank.submit_save(src, hashes), clock)
                    marks.append(("save", k, *times))
                    if not ok:
                        raise RuntimeError(f"a {k}-block save failed")
                    saved.append(hashes)
                for hashes in saved:
                    rank.poison(dst)
                    time.sleep(gap)
                    *times, ok = _timed(rank, lambda: rank.submit_load(dst, hashes), clock)
                    marks.append(("load", k, *times))
                    bad = rank.check(dst, hashes) if ok else ["failed"]
                    if bad:
                        raise RuntimeError(f"a {k}-block load came back wrong: {bad[:2]}")
            rank.shutdown()
        finally:
            server.stop()
        stamps = json.load(open(stamp_file))
    rows, table = [], {}
    for direction in ("save", "load"):
        for k in sizes:
            steps = _steps([m[2:] for m in marks if m[:2] == (direction, k)], stamps)
            table[f"{direction} {k}"] = steps
            for label, value in steps.items():
                if value is not None:
                    rows.append(Row(f"{direction} {k} blk", label, "p50", True, value, "us"))
    print_table(rows)
    write_json(args.json, "request_timeline", rows, {"steps_us": table, "n": args.n, "gap_ms": args.gap_ms,
                                                     **connector_switches(args)})


def _timed(rank, submit, clock) -> tuple[int, int, int, bool]:
    """(call start, call return, completion seen, ok) of one transfer."""
    from e2e_figures import _await

    t0 = clock()
    key = submit()
    t1 = clock()
    _, ok = _await(rank, key)
    return t0, t1, clock(), ok


def _steps(requests: list[tuple[int, int, int]], stamps: list) -> dict[str, float | None]:
    """Median microseconds of each step over the requests (None where a step never ran)."""
    per_step: dict[str, list[float]] = {label: [] for label, _, _ in STEPS}
    for t0, call, end in requests:
        first: dict[str, int] = {"t0": t0, "call": call, "end": end}
        last: dict[str, int] = {}
        for tag, t in stamps:
            if t0 <= t <= end:
                first.setdefault(tag, t)
                last[tag + ":last"] = t
        when = {**last, **first}
        for label, a, b in STEPS:
            if a in when and b in when:
                per_step[label].append((when[b] - when[a]) / 1e3)
    return {label: round(statistics.median(v), 1) if v else None for label, v in per_step.items()}


if __name__ == "__main__":
    main()
