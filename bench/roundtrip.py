"""Round trips of ONE block through the whole stack, and where their time goes.

Two drivers against a real server process: the client (``save``/``load`` then
``poll_completions`` until the job's completion) and the connector's worker side
(``wait_for_save``/``start_load_kv`` then ``collect`` until the job shows up, as
bench/e2e_figures.py ``_await`` does). ``health`` is the bare request/reply round trip of
the same stack; the ceiling of a save or load is that plus the copy (negligible for one
block in CPU mode).

``--profile`` runs the server in a child process with time stamps around each stage
(monkeypatched here, the library has no tracing) and prints the median time of every hop
of a client save and load: client send -> server recv -> reply -> engine booking -> copy ->
completion hand-off -> push -> client. Stamps on both sides use CLOCK_MONOTONIC
(perf_counter_ns), shared by the processes of one host.

    python bench/roundtrip.py --json /tmp/rt.json            # CPU mode
    python bench/roundtrip.py --device cuda:0 --json rt.json  # GPU server and KV cache
    python bench/roundtrip.py --profile                       # the per-hop breakdown
    python bench/roundtrip.py --device cuda:0 --profile [--spin-events]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, arg_parser, print_table, write_json  # noqa: E402
from server_latency import percentile, timed, wait_job  # noqa: E402

from pegaflow.client import PegaClient  # noqa: E402

PAGE = 4096
BLOCKS = 256


# ---- drivers ---------------------------------------------------------------------------------


STAMPS: list[tuple[str, int]] | None = None  # --profile: the client's own stamps


def _stamp(name: str) -> None:
    if STAMPS is not None:
        STAMPS.append((name, time.perf_counter_ns()))


def client_driver(endpoint: str, device: str, k: int = 1) -> tuple[PegaClient, Callable[[], None], Callable[[], None], Any]:
    client = PegaClient(endpoint, timeout_s=10.0, name="roundtrip")
    client.register_instance("rt", model="rt", kv_dtype="int8", layout="LBNHC", block_size=16, page_bytes=[PAGE, PAGE])
    backing = torch.randint(-128, 128, (2, BLOCKS, PAGE), dtype=torch.int8, device=device)
    client.register_kv_caches("rt", 0, backing, [(0, PAGE, PAGE), (BLOCKS * PAGE, PAGE, PAGE)], BLOCKS)
    held = [os.urandom(32) for _ in range(k)]
    client.save("rt", 0, 1, list(range(200, 200 + k)), held)
    wait_job(client, 1)
    jobs = iter(range(100, 1 << 40))
    event = torch.cuda.Event(interprocess=True) if device != "cpu" else None

    def wait_job_(job: int) -> None:
        wait_job(client, job)

    def save() -> None:
        job = next(jobs)
        if event is not None:
            event.record()
        client.save("rt", 0, job, list(range(k)), [os.urandom(32) for _ in range(k)], event=event)
        _stamp("cli_replied")
        wait_job_(job)

    def load() -> None:
        job = next(jobs)
        client.load("rt", 0, job, list(range(100, 100 + k)), held)
        _stamp("cli_replied")
        wait_job_(job)

    return client, save, load, backing


def worker_driver(endpoint: str, device: str, k: int = 1) -> tuple[Any, Callable[[], None], Callable[[], None]]:
    from e2e_shapes import SMOKE, build_rank_cache

    from pegaflow.connector.config import ConnectorSettings
    from pegaflow.connector.link import EngineLink
    from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
    from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry

    settings = ConnectorSettings(endpoint=endpoint, instance_id="rt-worker", rpc_timeout_s=10.0,
                                 transfer_timeout_s=60.0)
    geometry = InstanceGeometry("rt-worker", "smoke", "auto:bfloat16", "LBNHC", SMOKE.block_size, 1, False)
    worker = ConnectorWorker(settings, EngineLink(settings, "roundtrip"), geometry, rank=0)
    cache = build_rank_cache(SMOKE, "LBNHC", BLOCKS, 1, device)
    worker.register_kv_caches(cache.kv_caches, cache.kv_cache_config)
    if not worker._registered:
        raise RuntimeError("the worker could not register its KV cache (see the log)")
    held = tuple(os.urandom(32) for _ in range(k))
    jobs = iter(range(1 << 40, 1 << 41))

    def await_save(job: int) -> None:
        while True:
            worker.collect(0.05)
            meta = worker.take_worker_meta()
            if meta and job in meta.saves_done:
                if meta.saves_failed:
                    raise RuntimeError(f"save {job} failed")
                return

    def await_load(req: str) -> None:
        while True:
            worker.collect(0.05)
            finished, failed = worker.take_transfer_results()
            if req in finished:
                if req in failed:
                    raise RuntimeError(f"load {req} failed")
                return

    def save_with(hashes: tuple[bytes, ...]) -> None:
        job = next(jobs)
        worker.bind(PegaConnectorMetadata(save=SaveJob(job, tuple(range(k)), hashes)))
        worker.wait_for_save()
        worker.clear()
        await_save(job)

    def load() -> None:
        job = next(jobs)
        req = f"r{job}"
        worker.bind(PegaConnectorMetadata(loads=[LoadJob(job, req, tuple(range(100, 100 + k)), held)]))
        worker.start_load_kv()
        worker.clear()
        await_load(req)

    save_with(held)
    return worker, lambda: save_with(tuple(os.urandom(32) for _ in range(k))), load


# ---- the traced server (--profile) -----------------------------------------------------------


def pool_bytes_for(saves: int, k: int) -> int:
    """A pool that holds every block the run saves (fresh hashes each time) beside the held
    set: if saves evicted that set, the loads of it would fail (they did with --blocks 32)."""
    block = 2 * max(PAGE, 4096)  # the client's two regions (the worker's smoke blocks are smaller)
    return max(64 << 20, (saves + 4) * k * block * 2)


def traced_server(endpoint: str, device: str, out_path: str, ready: Any, spin: bool = False,
                  pool_bytes: int = 64 << 20) -> None:
    """A server in this process with stamps around its stages; dumps them on SIGTERM.

    ``spin``: the GPU lanes' completion events spin instead of blocking (an A/B of the
    completion thread's wake-up; the lane itself is not changed)."""
    import pickle

    from pegaflow.engine import Engine, EngineConfig
    from pegaflow.engine import transfer
    from pegaflow.server import service as service_mod
    from pegaflow.server.loop import ServerLoop, LoopConfig

    stamps: list[tuple[str, int]] = []
    now = time.perf_counter_ns

    def wrap(owner: Any, name: str, before: str | None, after: str | None) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # the code moved on: that stamp is missing from the breakdown
            print(f"roundtrip: no {type(owner).__name__}.{name} to stamp", file=sys.stderr)
            return

        def traced(*args: Any, **kwargs: Any) -> Any:
            if before:
                stamps.append((before, now()))
            try:
                return fn(*args, **kwargs)
            finally:
                if after:
                    stamps.append((after, now()))

        setattr(owner, name, traced)

    devices = () if device == "cpu" else (torch.device(device).index or 0,)
    # The server's default save path (`python -m pegaflow.server --save-path auto`), not the
    # in-process Engine's (staged): the breakdown is of the server as it runs.
    engine = Engine(EngineConfig(pool_bytes=pool_bytes, devices=devices, save_mode="auto"))
    server = ServerLoop(LoopConfig(endpoint=endpoint, tcp=None, client_timeout_s=30.0), engine, devices)
    server.bind()
    router = server.router
    recv = router.recv_multipart

    def traced_recv(*args: Any, **kwargs: Any) -> Any:
        parts = recv(*args, **kwargs)
        stamps.append(("wake_recv" if parts[0] == b"\xffpegaflow-wake" else "srv_recv", now()))
        return parts

    router.recv_multipart = traced_recv
    send = router.send_multipart

    def traced_send(parts: Any, *args: Any, **kwargs: Any) -> Any:
        out = send(parts, *args, **kwargs)
        stamps.append(("srv_sent", now()))
        return out

    router.send_multipart = traced_send
    wrap(service_mod.P, "decode_request", None, "decoded")
    wrap(server.service, "handle_frame", None, "handled")
    wrap(engine, "save", "engine_in", "engine_out")
    wrap(engine, "load", "engine_in", "engine_out")
    wrap(engine.index, "prepare_save", None, "booked")
    wrap(engine.index, "prepare_load", None, "booked")
    wrap(engine.index, "complete_save", "finish_in", None)
    wrap(engine.index, "unpin", "finish_in", None)
    for lane in engine._lanes.values():
        if isinstance(lane, transfer.CpuLane):
            wrap(lane, "_run", "copy_in", "copy_out")
        elif isinstance(lane, transfer.GpuLane):
            if spin:
                lane.new_event = lambda nbytes=0: torch.cuda.Event(blocking=False)
            wrap(lane, "_launch_locked", "launch_in", "launch_out")
            wrap(lane, "_done", "synced", None)  # the completion thread's event wait returned
    wrap(server.service, "_on_done", "on_done", None)
    wrap(server, "wake", None, "woken")
    wrap(server.service, "completions", None, "completions")
    signal.signal(signal.SIGTERM, server.request_stop)
    ready.put(True)
    if os.environ.get("ROUNDTRIP_CPROFILE"):  # a function-level profile of the server's loop
        import cProfile

        stamps.clear()
        cProfile.runctx("server.run()", globals(), {"server": server}, os.environ["ROUNDTRIP_CPROFILE"])
    else:
        server.run()
    with open(out_path, "wb") as f:
        pickle.dump(stamps, f)


def profile(device: str, n: int, k: int = 1, spin: bool = False) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="rt-")
    endpoint, out_path = f"ipc://{workdir}/s.sock", f"{workdir}/stamps.pkl"
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=traced_server, args=(endpoint, device, out_path, ready, spin,
                                                   pool_bytes_for(n + 50, k)))
    proc.start()
    ready.get(timeout=120)
    client, save, load, _backing = client_driver(endpoint, device, k)
    client_stamps: dict[str, list[tuple[str, int]]] = {"save": [], "load": []}
    for kind, fn in (("save", save), ("load", load)):
        timed(fn, 50)
    global STAMPS
    now = time.perf_counter_ns
    STAMPS = []
    for kind, fn in (("save", save), ("load", load)):
        for _ in range(n):
            t0 = now()
            fn()
            client_stamps[kind].append(("cli_call", t0))
            client_stamps[kind].append(("cli_done", now()))
    client.close()
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(60)
    import pickle

    with open(out_path, "rb") as f:
        stamps = pickle.load(f)
    return breakdown(stamps, client_stamps, n)


def breakdown(stamps: list[tuple[str, int]], client_stamps: dict[str, list[tuple[str, int]]], n: int) -> dict:
    """Median microseconds between consecutive stamps of each timed request, by hop."""
    # The timed requests are the last 2n of the server's jobs (each: a request, a completion).
    calls = {k: [t for name, t in v if name == "cli_call"] for k, v in client_stamps.items()}
    dones = {k: [t for name, t in v if name == "cli_done"] for k, v in client_stamps.items()}
    out: dict[str, Any] = {}
    for kind in ("save", "load"):
        hops: dict[str, list[float]] = {}
        totals = []
        for t0, t1 in zip(calls[kind], dones[kind]):
            inside = sorted((s for s in stamps + (STAMPS or []) if t0 <= s[1] <= t1), key=lambda s: s[1])
            seq = [("cli_call", t0), *inside, ("cli_done", t1)]
            totals.append((t1 - t0) / 1e3)
            for (a, ta), (b, tb) in zip(seq, seq[1:]):
                hops.setdefault(f"{a} -> {b}", []).append((tb - ta) / 1e3)
        out[kind] = {"total_p50_us": round(statistics.median(totals), 1),
                     "hops": {h: {"p50_us": round(statistics.median(v), 1), "count": len(v)}
                              for h, v in hops.items()}}
    return out


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    global PAGE
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N (server on that GPU, caches on it)")
    parser.add_argument("-n", type=int, default=1000, help="round trips per row")
    parser.add_argument("--profile", action="store_true", help="print the per-hop breakdown instead")
    parser.add_argument("--blocks", type=int, default=1, help="blocks per save and load (at most 56)")
    parser.add_argument("--page", type=int, default=PAGE,
                        help="bytes per page of the client's 2-region cache (65536: Llama-3-8B's rows, which saves "
                             "and loads take by 2D DMA; 4096: staged)")
    parser.add_argument("--spin-events", action="store_true",
                        help="--profile on a GPU: completion events spin (torch.cuda.Event(blocking=False)), an A/B")
    args = parser.parse_args()
    PAGE = args.page
    if args.profile:
        result = profile(args.device, args.n, args.blocks, args.spin_events)
        for kind, res in result.items():
            print(f"\n{kind}: total p50 {res['total_p50_us']} us")
            for hop, v in res["hops"].items():
                if v["count"] >= args.n // 2:
                    print(f"  {hop:32s} {v['p50_us']:8.1f} us  ({v['count']})")
        write_json(args.json, "roundtrip_profile", [], {"profile": result})
        return
    from pegaflow.server.spawn import ServerProcess

    server_device = "cpu" if args.device == "cpu" else str(torch.device(args.device).index or 0)
    # Client and worker each save 50 + n times (warm-up, then n in rounds).
    server = ServerProcess(pool_size=str(pool_bytes_for(2 * (args.n + 50), args.blocks)), client_timeout=30.0,
                           device=server_device)
    rows: list[Row] = []
    results: dict[str, Any] = {}
    try:
        client, c_save, c_load, _backing = client_driver(server.ipc, args.device, args.blocks)
        worker, w_save, w_load = worker_driver(server.ipc, args.device, args.blocks)
        blocks = f"{args.blocks}-block"
        ops = {("client", "health"): lambda: client.health(), ("client", f"save-{blocks}"): c_save,
               ("client", f"load-{blocks}"): c_load, ("worker", f"save-{blocks}"): w_save,
               ("worker", f"load-{blocks}"): w_load}
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in ops}
        for fn in ops.values():
            timed(fn, 50)
        for _ in range(10):  # interleaved, so that every row sees the same machine load
            for key, fn in ops.items():
                samples[key] += timed(fn, max(1, args.n // 10))
        health = percentile(samples[("client", "health")], 0.5)
        for (driver, op), values in samples.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            results[f"{driver}/{op}"] = {"p50_us": round(p50, 1), "p99_us": round(p99, 1),
                                         "mean_us": round(statistics.fmean(values), 1), "samples": len(values)}
            for q, value in (("p50", p50), ("p99", p99)):
                rows.append(Row(config=driver, direction=op, method=f"{q} us (ceiling: health p50)", ours=True,
                                value=round(value, 1), unit="us", ceiling=round(health, 1),
                                ratio=round(health / value, 3)))
        worker.shutdown()
        client.close()
    finally:
        server.stop()
    print_table(rows)
    write_json(args.json, "roundtrip", rows, {"device": args.device, "results": results})


if __name__ == "__main__":
    main()
