"""Round trips of a raw ZMQ echo between two processes, as the client and server talk (diagnostic).

On the H100 host a lone request's hops between the processes cost ~150-540 us each
(bench/NOTES.md, session 13), far more than on the dev machine (~33 us). If that is the
threads' wake-up after idle, a bare echo shows it too: hot (back to back), after a 2 ms sleep
(as between requests), with the client busy-waiting through the gap instead (its core stays
awake), and with either side busy-polling its socket instead of blocking in the receive.
The same ipc transport and socket types as the server (ROUTER) and client (DEALER).

    python bench/wake_latency.py --json bench/results/wake_latency-h100.json
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
CASES = (  # (server, client, gap between round trips)
    ("block", "block", "none"),
    ("block", "block", "sleep"),
    ("block", "block", "busy"),
    ("block", "spin", "sleep"),
    ("spin", "block", "sleep"),
    ("spin", "spin", "sleep"),
    ("spin", "spin", "none"),
)


def _echo(endpoint: str, mode: str, ready, stop) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    sock.setsockopt(zmq.RCVTIMEO, 100)
    ready.set()
    while not stop.is_set():
        if mode == "spin":
            while not sock.getsockopt(_EVENTS) & _POLLIN and not stop.is_set():
                pass
        try:
            parts = sock.recv_multipart()
        except zmq.Again:
            continue
        sock.send_multipart(parts)
    sock.close(0)
    ctx.term()


def round_trips(endpoint: str, server: str, client: str, gap: str, n: int, gap_s: float) -> list[float]:
    """Microseconds of ``n`` round trips of a 200-byte message (after 20 unmeasured ones)."""
    spawn = mp.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    proc = spawn.Process(target=_echo, args=(endpoint, server, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("the echo process did not start")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    msg, out = b"x" * 200, []
    try:
        for _ in range(n + 20):
            if gap == "sleep":
                time.sleep(gap_s)
            elif gap == "busy":
                end = time.perf_counter() + gap_s
                while time.perf_counter() < end:
                    pass
            t0 = time.perf_counter_ns()
            sock.send(msg)
            if client == "spin":
                while not sock.getsockopt(_EVENTS) & _POLLIN:
                    pass
            sock.recv()
            out.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        stop.set()
        proc.join(10)
        sock.close(0)
        ctx.term()
    return out[20:]


def main() -> None:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="round trips per case")
    p.add_argument("--gap-ms", type=float, default=2.0)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for server, client, gap in CASES:
            times = round_trips(f"ipc://{os.path.join(tmp, 'echo.sock')}", server, client, gap, args.n,
                                args.gap_ms / 1e3)
            p90 = sorted(times)[int(0.9 * len(times))]
            rows.append(Row("zmq ipc echo", f"gap {gap}", f"server {server} / client {client}", False,
                            round(statistics.median(times), 1), "us", note=f"p90 {p90:.1f} us, n={len(times)}"))
            print(f"server {server:5} client {client:5} gap {gap:5}: p50 {rows[-1].value:7.1f} us, p90 {p90:7.1f}",
                  flush=True)
    print_table(rows)
    write_json(args.json, "wake_latency", rows, {"gap_ms": args.gap_ms, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
