"""Round trips to a real PegaFlow server (CPU mode) over IPC and TCP, against a bare ZMQ echo.

For each transport and operation: health, query of 1,000 hashes (all held, and the first one
missing) from a list of hashes (``client.query``), the held one from hashes already joined
(``-blob``: ``client.query_blob``, the form the connector keeps per request and sends), the
same two queries as prebuilt frames on a bare DEALER (``-raw``: the server's share
alone, without the client's encode and decode), save of one block and load of one block (send
to completion). Each is timed from the client's call to its answer; the ceiling is a bare
pyzmq ROUTER (another process) echoing the very bytes of that request to a DEALER, measured in
the same run, interleaved round by round with ours so that both see the same machine load.

The server busy-polls its socket for ``--spin-us`` (2 ms by default) after each message
while no transfer is in flight; the blocking echo does not, so ours can beat it. A second
echo that busy-polls the same way is measured as a peer (``spin_echo_*``, rows
``pegaflow p50 us (ratio=busy-poll echo/ours)``): the fair ceiling for the server's own work.

Rows: ``value`` is our p50 or p99 in microseconds, ``ceiling`` the echo's; ``ratio`` is
echo / ours (higher is better; 1/1.3 = 0.77 is the p50 target, 1/3 = 0.33 the p99 one).

    python bench/server_latency.py --json bench/results/server_latency-cpu.json
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, arg_parser, print_table, write_json  # noqa: E402

from pegaflow.client import PegaClient  # noqa: E402
from pegaflow.server.__main__ import build_parser as server_cli  # noqa: E402
from pegaflow.server.protocol import PROTOCOL_VERSION  # noqa: E402
from pegaflow.server.spawn import ServerProcess  # noqa: E402

QUERY_HASHES = 1000
TARGET_P50, TARGET_P99 = 1.3, 3.0


def echo_server(ipc: str, port_queue: mp.Queue, spin_s: float = 0.0) -> None:
    """A bare ROUTER that sends every frame back to its sender. ``spin_s``: after each message
    it busy-polls its socket that long before blocking, as the server does (``--spin-us``)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(ipc)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_queue.put(port)
    spin = False
    while True:
        if spin:
            end = time.perf_counter() + spin_s
            while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN and time.perf_counter() < end:
                pass
        spin = spin_s > 0
        identity, frame = sock.recv_multipart(copy=False)
        if frame.bytes == b"stop":
            sock.send_multipart([identity, b"stopped"])
            break
        sock.send_multipart([identity, frame], copy=False)
    sock.close()
    ctx.term()


class Echo:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)

    def round_trip(self, payload: bytes) -> bytes:
        self.sock.send(payload)
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def timed(fn: Callable[[], None], count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def wait_job(client: PegaClient, job_id: int) -> None:
    while True:
        for done in client.poll_completions(timeout_s=5.0):
            if done.job_id == job_id:
                if not done.ok:
                    raise RuntimeError(f"job {job_id} failed: {done.error}")
                return


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of ours vs echo")
    parser.add_argument("--per-round", type=int, default=100, help="round trips per operation per round")
    parser.add_argument("--spin-us", type=float, default=None,
                        help="the server's --spin-us, and the busy-poll echo's window (default: the server's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    spin_us = server_cli().get_default("spin_us") if args.spin_us is None else args.spin_us

    server = ServerProcess(*(["--spin-us", str(args.spin_us)] if args.spin_us is not None else []),
                           pool_size="256mb", client_timeout=30.0)
    ctx = mp.get_context("spawn")
    echoes = {}
    for name, spin_s in (("echo", 0.0), ("spin_echo", spin_us * 1e-6)):
        ipc = f"ipc://{server.dir}/{name}.sock"
        ports: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=echo_server, args=(ipc, ports, spin_s), daemon=True)
        proc.start()
        echoes[name] = (proc, ipc, f"tcp://127.0.0.1:{ports.get(timeout=60)}")

    rows: list[Row] = []
    extra: dict = {"targets": {"query_p50_x_echo": TARGET_P50, "query_p99_x_echo": TARGET_P99},
                   "server_spin_us": spin_us, "results": {}}
    try:
        for i, transport in enumerate(("ipc", "tcp")):
            ours_ep = server.ipc if transport == "ipc" else server.tcp
            rows += measure(transport, ours_ep, echoes["echo"][1 + i], echoes["spin_echo"][1 + i], args.rounds,
                            args.per_round, extra["results"])
    finally:
        for proc, ipc, _ in echoes.values():
            stopper = Echo(ipc)
            stopper.round_trip(b"stop")
            stopper.close()
            proc.join(10)
        server.stop()
    rows += engine_index_rows(args.rounds * args.per_round, extra["results"])
    print_table(rows)
    ipc = extra["results"]["ipc"]["query-hit"]
    print(f"\nquery of {QUERY_HASHES} held hashes over IPC: p50 {ipc['p50_x_echo']:.2f}x the echo's "
          f"(target <= {TARGET_P50}), p99 {ipc['p99_x_echo']:.2f}x (target <= {TARGET_P99})")
    for name in ("query-hit-blob", "query-miss", "query-hit-raw", "query-miss-raw"):
        row = extra["results"]["ipc"][name]
        print(f"{name} over IPC: p50 {row['p50_x_echo']:.2f}x the echo's, p99 {row['p99_x_echo']:.2f}x; "
              f"p50 {row['p50_x_spin_echo']:.2f}x the busy-poll echo's")
    write_json(args.json, "server_latency", rows, extra)


def measure(transport: str, endpoint: str, echo_endpoint: str, spin_echo_endpoint: str, rounds: int,
            per_round: int, results: dict) -> list[Row]:
    client = PegaClient(endpoint, timeout_s=10.0, name=f"bench-{transport}")
    echo = Echo(echo_endpoint)
    spin_echo = Echo(spin_echo_endpoint)
    instance = f"bench-{transport}"
    page = 4096  # one block: 2 regions of 4 KiB
    client.register_instance(instance, model="bench", kv_dtype="int8", layout="LBNHC", block_size=16,
                             page_bytes=[page, page])
    blocks = 64
    backing = torch.randint(-128, 128, (2, blocks, page), dtype=torch.int8)
    client.register_kv_caches(instance, 0, backing, [(0, page, page), (blocks * page, page, page)], blocks)
    held = [os.urandom(32) for _ in range(QUERY_HASHES)]
    client.save(instance, 0, 1, [i % blocks for i in range(QUERY_HASHES)], held)  # 1,000 entries from 64 blocks
    wait_job(client, 1)
    assert client.query(instance, held) == QUERY_HASHES
    missing = [os.urandom(32)] + held[1:]
    load_hash = held[:1]
    jobs = iter(range(100, 1 << 40))

    def save_one() -> None:
        job = next(jobs)
        client.save(instance, 0, job, [3], [os.urandom(32)])
        wait_job(client, job)

    def load_one() -> None:
        job = next(jobs)
        client.load(instance, 0, job, [5], load_hash)
        wait_job(client, job)

    def packed(msg: dict) -> bytes:
        return msgpack.packb({"id": 1, **msg}, use_bin_type=True)

    blob = b"".join(held)
    # The same queries as prebuilt frames on a bare DEALER with its own session: the server's
    # share of the round trip alone, without the client's encode (the hashes' join, msgpack)
    # and decode.
    raw = Echo(endpoint)
    raw.round_trip(packed({"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid(), "name": "bench-raw"}))
    hit_frame = packed({"op": "query", "instance_id": instance, "hashes": blob, "hash_bytes": 32})
    miss_frame = packed({"op": "query", "instance_id": instance, "hashes": b"".join(missing), "hash_bytes": 32})
    assert msgpack.unpackb(raw.round_trip(hit_frame))["hits"] == QUERY_HASHES
    ops: dict[str, tuple[Callable[[], None], bytes]] = {
        "health": (client.health, packed({"op": "health"})),
        "query-hit": (lambda: client.query(instance, held), hit_frame),
        "query-miss": (lambda: client.query(instance, missing),
                       packed({"op": "query", "instance_id": instance, "hashes": blob, "hash_bytes": 32})),
        "query-hit-blob": (lambda: client.query_blob(instance, blob, 32), hit_frame),
        "query-hit-raw": (lambda: raw.round_trip(hit_frame), hit_frame),
        "query-miss-raw": (lambda: raw.round_trip(miss_frame), miss_frame),
        "save-1-block": (save_one, packed({"op": "save", "instance_id": instance, "rank": 0, "job_id": 5,
                                           "block_ids": [3], "hashes": os.urandom(32), "hash_bytes": 32})),
        "load-1-block": (load_one, packed({"op": "load", "instance_id": instance, "rank": 0, "job_id": 5,
                                           "block_ids": [5], "hashes": held[0], "hash_bytes": 32})),
    }
    ours: dict[str, list[float]] = {name: [] for name in ops}
    ceiling: dict[str, list[float]] = {name: [] for name in ops}
    spin_ceiling: dict[str, list[float]] = {name: [] for name in ops}
    for name, (fn, payload) in ops.items():  # warm up every path
        timed(fn, 50)
        timed(lambda: echo.round_trip(payload), 50)
        timed(lambda: spin_echo.round_trip(payload), 50)
    for _ in range(rounds):
        for name, (fn, payload) in ops.items():
            ceiling[name] += timed(lambda: echo.round_trip(payload), per_round)
            ours[name] += timed(fn, per_round)
            spin_ceiling[name] += timed(lambda: spin_echo.round_trip(payload), per_round)
    client.close()
    echo.close()
    spin_echo.close()
    raw.close()

    rows = []
    results[transport] = {}
    for name in ops:
        p50, p99 = percentile(ours[name], 0.50), percentile(ours[name], 0.99)
        e50, e99 = percentile(ceiling[name], 0.50), percentile(ceiling[name], 0.99)
        s50 = percentile(spin_ceiling[name], 0.50)
        results[transport][name] = {
            "p50_us": round(p50, 1), "p99_us": round(p99, 1), "echo_p50_us": round(e50, 1),
            "echo_p99_us": round(e99, 1), "p50_x_echo": round(p50 / e50, 3), "p99_x_echo": round(p99 / e99, 3),
            "spin_echo_p50_us": round(s50, 1), "p50_x_spin_echo": round(p50 / s50, 3),
            "mean_us": round(statistics.fmean(ours[name]) * 1e6, 1), "samples": len(ours[name]),
            "request_bytes": len(ops[name][1]),
        }
        for q, value, ceil in (("p50", p50, e50), ("p99", p99, e99)):
            rows.append(Row(config=transport, direction=name, method=f"pegaflow {q} us (ratio=echo/ours)", ours=True,
                            value=round(value, 1), unit="us", ceiling=round(ceil, 1), ratio=round(ceil / value, 3)))
        rows.append(Row(config=transport, direction=name, method="pegaflow p50 us (ratio=busy-poll echo/ours)",
                        ours=True, value=round(p50, 1), unit="us", ceiling=round(s50, 1), ratio=round(s50 / p50, 3)))
    return rows


def engine_index_rows(count: int, results: dict) -> list[Row]:
    """The server's own work for the same requests, in this process: no wire, no client.

    The engine's index query of the same 1,000 held hashes, and ``Service.handle_frame`` (decode,
    checks, dispatch, the index, the reply) for health and that query. Both are part of the round
    trips above (hot here, colder there); shown so the table says where the time goes.
    """
    from pegaflow.engine import Engine, EngineConfig
    from pegaflow.kernels import KVRegions, Region
    from pegaflow.server import protocol as P
    from pegaflow.server.service import Service

    engine = Engine(EngineConfig(pool_bytes=64 << 20))
    service = Service(engine, devices=(), client_timeout_s=30.0)
    identity = b"P" + os.urandom(15)

    def call(msg: dict) -> dict:
        reply = msgpack.unpackb(service.handle_frame(identity, msgpack.packb(msg, use_bin_type=True), 0.0))
        assert reply["ok"], reply
        return reply

    call({"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
    namespace = call({"op": "register_instance", "id": 2, "instance_id": "local", "model": "bench",
                      "kv_dtype": "int8", "layout": "LBNHC", "block_size": 16, "page_bytes": [4096]})["namespace"]
    kv = torch.zeros(QUERY_HASHES * 4096, dtype=torch.int8)
    engine.register_kv("local", 0, KVRegions((Region(kv, 0, 4096, 4096),), QUERY_HASHES))
    held = [os.urandom(32) for _ in range(QUERY_HASHES)]
    engine.save("local", 0, list(range(QUERY_HASHES)), held).wait(60)
    blob = b"".join(held)
    assert engine.index.query_blob(namespace, blob, 32) == QUERY_HASHES
    frames = {"health": msgpack.packb({"op": "health", "id": 3}, use_bin_type=True),
              "query-hit": msgpack.packb({"op": "query", "id": 4, "instance_id": "local", "hashes": blob,
                                          "hash_bytes": 32}, use_bin_type=True)}
    fns = {"index": lambda: engine.index.query_blob(namespace, blob, 32),
           **{name: (lambda frame=frame: service.handle_frame(identity, frame, 1.0)) for name, frame in frames.items()}}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm up
        timed(fn, 200)
    for _ in range(max(1, count // 100)):  # interleaved, as the round trips are: same machine load for each
        for name, fn in fns.items():
            times[name] += timed(fn, 100)
    engine.close()
    ipc = results["ipc"]["query-hit"]
    p50 = percentile(times["index"], 0.5)
    results["engine_index_query_hit"] = {"p50_us": round(p50, 1), "p99_us": round(percentile(times["index"], 0.99), 1),
                                         "share_of_ipc_query_hit_p50": round(p50 / ipc["p50_us"], 3)}
    results["handle_frame_alone"] = {name: {"p50_us": round(percentile(times[name], 0.5), 1),
                                            "p99_us": round(percentile(times[name], 0.99), 1)} for name in frames}
    rows = []
    for key, direction, method in (("index", "query-hit", "engine index alone"),
                                   ("query-hit", "query-hit", "service.handle_frame alone"),
                                   ("health", "health", "service.handle_frame alone")):
        for q in (0.5, 0.99):
            rows.append(Row(config="in-process", direction=direction, method=f"{method} p{int(q * 100)} us (no ratio)",
                            ours=True, value=round(percentile(times[key], q), 1), unit="us"))
    return rows


if __name__ == "__main__":
    main()
