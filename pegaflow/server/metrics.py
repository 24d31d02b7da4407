"""Prometheus text on ``--metrics-port``: ``/metrics`` and a ``/health`` route.

The figures are read at scrape time from the service's plain counters and ``engine.stats()``,
so the request path pays nothing for them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

# engine.stats() keys exported as counters; every other numeric key becomes a gauge.
_ENGINE_COUNTERS = ("hits", "misses", "bytes_saved", "bytes_loaded", "evictions", "skipped_saves")


class ServiceCollector:
    """Turns a Service's counters and its engine's stats into metric families."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        c = s.counters
        yield _counter("pegaflow_queries", "Queries answered", c.queries)
        yield _counter("pegaflow_query_hits", "Queried blocks held (the hit prefix)", c.hits)
        yield _counter("pegaflow_query_misses", "Queried blocks past the hit prefix", c.misses)
        transfers = CounterMetricFamily("pegaflow_transfers", "Saves and loads completed", labels=["kind", "ok"])
        nbytes = CounterMetricFamily("pegaflow_transfer_bytes", "Bytes moved by completed transfers", labels=["kind"])
        blocks = CounterMetricFamily("pegaflow_transfer_blocks", "Blocks moved by completed transfers",
                                     labels=["kind"])
        seconds = CounterMetricFamily("pegaflow_transfer_seconds", "Time from acceptance to completion",
                                      labels=["kind"])
        gbps = GaugeMetricFamily("pegaflow_transfer_bandwidth_gbps", "Bandwidth of the last transfer (GB/s)",
                                 labels=["kind"])
        for kind in ("save", "load"):
            transfers.add_metric([kind, "true"], c.transfers[kind] - c.failed[kind])
            transfers.add_metric([kind, "false"], c.failed[kind])
            nbytes.add_metric([kind], c.nbytes[kind])
            blocks.add_metric([kind], c.blocks[kind])
            seconds.add_metric([kind], c.seconds[kind])
            gbps.add_metric([kind], c.last_gbps[kind])
        yield from (transfers, nbytes, blocks, seconds, gbps)
        yield _counter("pegaflow_skipped_blocks", "Blocks a save skipped (held already, or no room)",
                       c.skipped_blocks)
        yield _counter("pegaflow_missing_blocks", "Blocks a load did not find", c.missing_blocks)
        errors = CounterMetricFamily("pegaflow_errors", "Error replies by code", labels=["code"])
        for code, count in sorted(c.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield _counter("pegaflow_sessions_expired", "Clients released after going silent", c.sessions_expired)
        yield _counter("pegaflow_fast_messages", "Transfers received by the fast lane (Unix datagrams)",
                       c.fast_messages)
        yield _counter("pegaflow_board_notices", "Completions also marked on a client's completion board",
                       c.board_notices)
        yield _gauge("pegaflow_sessions", "Connected clients", len(s.sessions))
        yield _gauge("pegaflow_registrations", "KV caches registered", len(s.registrations))
        yield _gauge("pegaflow_open_mappings", "Shared KV cache mappings open", s.open_mappings)
        yield _gauge("pegaflow_inflight_jobs", "Transfers in flight", len(s.jobs))
        try:
            engine = s.engine.stats()
        except Exception:
            logger.exception("engine.stats() failed during a scrape")
            return
        for key, value in sorted(engine.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"pegaflow_engine_{key}"
            if key in _ENGINE_COUNTERS:
                yield _counter(name, f"engine {key}", value)
            else:
                yield _gauge(name, f"engine {key}", value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class MetricsServer:
    """An HTTP server thread: ``/metrics`` (Prometheus text) and ``/health`` (JSON)."""

    def __init__(self, service: Any, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, status = generate_latest(registry), "text/plain; version=0.0.4", 200
                elif path == "/health":
                    ok = not service.stopping
                    body = json.dumps({"status": "ok" if ok else "stopping"}).encode()
                    ctype, status = "application/json", 200 if ok else 503
                else:
                    body, ctype, status = b"not found: try /metrics or /health\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("metrics http: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="pegaflow-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
