"""``python -m pegaflow.server``: start a PegaFlow server (``--help`` explains every flag)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pegaflow.client import DEFAULT_ENDPOINT

logger = logging.getLogger("pegaflow.server")

DEFAULT_ADDR = "127.0.0.1:50055"
DEFAULT_POOL_GPU = "30gb"
DEFAULT_POOL_CPU = "1gb"  # CPU mode (no CUDA): a laptop- and CI-sized pool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pegaflow.server",
        description="PegaFlow server: holds vLLM KV cache blocks in a pinned CPU pool and serves "
        "vLLM workers (over IPC and TCP) that save and load them. Without CUDA it runs in CPU mode "
        "(plain memory, torch copies), which is what tests and laptops use.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--addr", default=DEFAULT_ADDR,
                        help="TCP HOST:PORT to listen on as well (port 0 picks a free one; 'none' disables TCP)")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                        help="ZMQ IPC endpoint to listen on (its socket file is created with mode 0600); "
                        "clients use it when PEGAFLOW_ENGINE_ENDPOINT is unset")
    parser.add_argument("--device", default="0",
                        help="GPU id or comma-separated ids (e.g. 0,1) whose KV caches this server serves, "
                        "with copy streams on each; 'cpu' forces CPU mode, which is also used when CUDA is absent")
    parser.add_argument("--pool-size", default=None,
                        help=f"bytes of host memory for the block pool: 30gb, 512MB, 1.5tb, 64kb or plain bytes "
                        f"(default {DEFAULT_POOL_GPU} on a GPU host, {DEFAULT_POOL_CPU} in CPU mode)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus text on http://METRICS_HOST:PORT/metrics and a /health route; 0 = off")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the metrics route (counters only, no KV data); a non-loopback address "
                        "needs --allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow --addr/--endpoint/--metrics-host beyond loopback; the server then also needs "
                        "a shared secret that every client presents (--auth-token-file or $PEGAFLOW_AUTH_TOKEN)")
    parser.add_argument("--auth-token-file", default=None,
                        help="file holding the shared secret (16+ printable characters, mode 600) every client must "
                        "present in its hello (clients read $PEGAFLOW_AUTH_TOKEN); default: $PEGAFLOW_AUTH_TOKEN "
                        "if set, else no secret (allowed on loopback and IPC only)")
    parser.add_argument("--client-timeout", type=float, default=10.0,
                        help="seconds a client may stay silent (clients heartbeat every quarter of it) before its "
                        "KV cache registrations are released")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGINT/SIGTERM, seconds transfers in flight get to finish before they are "
                        "reported failed")
    parser.add_argument("--staging-size", default=None,
                        help="GPU staging memory per device and direction (two halves: gathering chunk k+1 "
                        "overlaps the DMA of chunk k), e.g. 128mb (default: the engine's, 128 MiB)")
    parser.add_argument("--save-path", choices=("auto", "dma", "staged", "zero_copy"), default="auto",
                        help="how saves reach the pool: dma = the copy engines alone, one 2D copy per block, so "
                        "the model's process keeps the SMs (0.92 of PCIe with 64 KiB pages, less with smaller "
                        "ones; beside running loads too); staged = a short gather into GPU staging, then DMA (0.97-0.99 of PCIe at every "
                        "page size, but the gathers slow the model by ~10%%); auto = dma where pages are >= 64 KiB, "
                        "else staged (default); zero_copy = kernels write pinned memory directly (in-process use "
                        "only). With dma (and auto where it picks dma), loads of up to --staging-size bytes also go by the copy engines "
                        "alone, so the model keeps the SMs (a load that finds the load path idle, which a request "
                        "waits on: up to half that, as staged copies run nearer PCIe speed); longer loads are staged")
    parser.add_argument("--switch-interval", type=float, default=0.0005,
                        help="seconds a Python thread may hold the GIL while another waits (sys.setswitchinterval; "
                        "Python's default is 0.005): short keeps request latency's tail short")
    parser.add_argument("--spin-us", type=float, default=2000.0,
                        help="after each message, while no transfer is in flight, microseconds the server "
                        "busy-polls its socket before it sleeps: a request that follows within them is read "
                        "at once (1,000-hash queries ~25%% faster on the dev machine); costs that much CPU "
                        "per message; 0 = always sleep")
    parser.add_argument("--write-timeout", type=float, default=30.0,
                        help="seconds after which a block that some ranks never finished saving is reclaimed")
    return parser


def _devices(text: str) -> tuple[tuple[int, ...], str | None]:
    """The GPUs to serve, or () for CPU mode with the reason."""
    if text.strip().lower() == "cpu":
        return (), "--device cpu"
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"--device must be an id, a list like 0,1, or cpu; got {text!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise SystemExit(f"--device must list distinct non-negative ids, got {text!r}")
    import torch

    if not torch.cuda.is_available():
        return (), "CUDA is not available"
    count = torch.cuda.device_count()
    if max(ids) >= count:
        raise SystemExit(f"--device {text}: this host has {count} CUDA device(s)")
    return ids, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from pegaflow.engine import Engine, EngineConfig, heap, parse_size
    from pegaflow.server import exposure
    from pegaflow.server.loop import LoopConfig, ServerLoop, tcp_endpoint
    from pegaflow.server.metrics import MetricsServer

    devices, cpu_reason = _devices(args.device)
    pool_text = args.pool_size or (DEFAULT_POOL_CPU if cpu_reason else DEFAULT_POOL_GPU)
    try:
        if not 0 <= args.spin_us <= 10_000:
            raise ValueError(f"--spin-us must be in [0, 10000] microseconds, got {args.spin_us}")
        if not args.switch_interval > 0:
            raise ValueError(f"--switch-interval must be > 0 seconds, got {args.switch_interval}")
        pool_bytes = parse_size(pool_text)
        tcp = None if args.addr.lower() == "none" else tcp_endpoint(args.addr)
        token = exposure.load_token(args.auth_token_file)
        loop_config = LoopConfig(endpoint=args.endpoint, tcp=tcp, client_timeout_s=args.client_timeout,
                                 drain_timeout_s=args.drain_timeout, allow_remote=args.allow_remote,
                                 auth_token=token, spin_s=args.spin_us * 1e-6)
        if args.metrics_port and not args.allow_remote and not exposure.is_local(f"tcp://{args.metrics_host}:0"):
            raise ValueError(f"refusing to serve metrics on {args.metrics_host}: a non-loopback address needs "
                             "--allow-remote")
        staging = {"staging_bytes": parse_size(args.staging_size)} if args.staging_size else {}
        engine_config = EngineConfig(pool_bytes=pool_bytes, devices=devices, write_timeout_s=args.write_timeout,
                                     save_mode=args.save_path, **staging)
    except ValueError as exc:
        raise SystemExit(f"pegaflow.server: {exc}") from None
    if cpu_reason:
        logger.warning("CPU mode (%s): plain memory and torch copies, no GPU transfers%s", cpu_reason,
                       "" if args.pool_size else f"; pool defaults to {DEFAULT_POOL_CPU}")
    engine = Engine(engine_config)
    server = ServerLoop(loop_config, engine, devices)
    try:
        bound = server.bind()
    except (ValueError, Exception) as exc:
        engine.close()
        raise SystemExit(f"pegaflow.server: cannot bind: {exc}") from None
    metrics = None
    if args.metrics_port:
        metrics = MetricsServer(server.service, args.metrics_port, host=args.metrics_host)
        metrics.start()
    heap.settle()  # full collections would scan torch's and numba's objects: ~0.1 s stalls
    # The loop, the launchers and the completion threads share the GIL; a thread that wants it
    # waits up to the switch interval (5 ms by default) behind one that computes. Requests'
    # p99 on the H200 host sat at ~4-4.5 ms, one interval; 0.5 ms brought it to ~1.2 ms.
    sys.setswitchinterval(args.switch_interval)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    logger.info(
        "pegaflow server ready: listening on %s; pool %s (%d bytes); devices %s; client timeout %.1f s; metrics %s; "
        "auth %s",
        " and ".join(bound), pool_text, pool_bytes,
        ",".join(f"cuda:{d}" for d in devices) if devices else "cpu (CPU mode)", args.client_timeout,
        f"http://{args.metrics_host}:{metrics.port}/metrics" if metrics else "off",
        "token required" if token else "off (local only)",
    )
    server.run()
    if metrics:
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
