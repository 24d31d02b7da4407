"""``python -m pegaflow.cli status [--endpoint E]``: a running server's pool, instances and hit rate."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pegaflow.client import PegaClient, PegaClientError, default_endpoint


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def format_status(stats: dict[str, Any], endpoint: str) -> str:
    server, engine = stats.get("server", {}), stats.get("engine", {})
    pool = engine.get("pool_bytes", 0)
    used = engine.get("pool_used", 0)
    lines = [
        f"server     {endpoint}  up {server.get('uptime_s', 0):.0f} s  "
        + ("CPU mode" if server.get("cpu_mode") else "devices " + ",".join(f"cuda:{d}" for d in server.get("devices", []))),
        f"pool       {_size(used)} used of {_size(pool)} ({100 * used / pool if pool else 0:.1f} %), "
        f"{_size(engine.get('pool_free', 0))} free; {engine.get('entries_ready', 0)} blocks ready, "
        f"{engine.get('evictions', 0)} evicted",
        f"hit rate   {100 * server.get('hit_rate', 0):.1f} % ({server.get('hits', 0)} of "
        f"{server.get('hits', 0) + server.get('misses', 0)} queried blocks, {server.get('queries', 0)} queries)",
        f"transfers  {server.get('saves', 0)} saves ({_size(server.get('bytes_saved', 0))}), "
        f"{server.get('loads', 0)} loads ({_size(server.get('bytes_loaded', 0))}); "
        f"{server.get('inflight_jobs', 0)} in flight",
        f"clients    {server.get('sessions', 0)} connected, {server.get('registrations', 0)} KV caches registered",
    ]
    instances = stats.get("instances", [])
    lines.append(f"instances  {len(instances)}")
    for inst in instances:
        lines.append(f"  {inst['instance_id']}: {inst['namespace']}  tp {inst['tp_size']}  "
                     f"{_size(inst['block_bytes'])}/block  ranks registered {inst['ranks']}")
    errors = server.get("errors") or {}
    if errors:
        lines.append("errors     " + ", ".join(f"{code} {n}" for code, n in sorted(errors.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pegaflow.cli", description="Talk to a running PegaFlow server.")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="print the pool, the instances and the hit rate")
    status.add_argument("--endpoint", default=None,
                        help=f"server endpoint (default: $PEGAFLOW_ENGINE_ENDPOINT or {default_endpoint()})")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the server")
    status.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    args = parser.parse_args(argv)
    endpoint = args.endpoint or default_endpoint()
    client = PegaClient(endpoint, timeout_s=args.timeout, name="pegaflow-cli", heartbeat=False)
    try:
        stats = client.stats()
    except PegaClientError as exc:
        print(f"pegaflow: cannot reach a server at {endpoint}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(stats, indent=2) if args.json else format_status(stats, endpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
