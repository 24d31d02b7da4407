"""The server's event loop: one thread owns the ROUTER socket.

It waits on the socket and on a wake-up pipe (written by the engine's completion callbacks
and by the signal handler), answers requests through :class:`Service`, pushes completions,
and sweeps silent sessions every heartbeat period. A stop request (SIGINT/SIGTERM) makes
new requests fail with ``shutting_down``, lets transfers in flight finish for up to
``drain_timeout_s`` (then reports them failed), closes every registration, closes the
engine, removes the IPC socket file and returns.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import zmq

from pegaflow.server import protocol as P
from pegaflow.server.service import Service

logger = logging.getLogger(__name__)

# Requests handled per wake before completions and the sweep get a turn.
_BATCH = 256


@dataclass(frozen=True)
class LoopConfig:
    """Where to listen and how long to wait for clients."""

    endpoint: str  # ipc://PATH (or any ZMQ endpoint)
    tcp: str | None  # tcp://HOST:PORT; port 0 picks a free one
    client_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or "://" not in self.endpoint:
            raise ValueError(f"endpoint must look like ipc:///tmp/pega_engine.sock, got {self.endpoint!r}")
        if self.tcp is not None and not self.tcp.startswith("tcp://"):
            raise ValueError(f"tcp must look like tcp://127.0.0.1:50055, got {self.tcp!r}")
        if not self.client_timeout_s > 0:
            raise ValueError(f"client_timeout_s must be > 0, got {self.client_timeout_s!r}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s!r}")


def tcp_endpoint(addr: str) -> str:
    """``127.0.0.1:50055`` (or ``tcp://...``) as a ZMQ endpoint; port 0 binds a free port."""
    text = addr if addr.startswith("tcp://") else f"tcp://{addr}"
    host, sep, port = text[len("tcp://"):].rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    return f"tcp://{host}:*" if int(port) == 0 else text


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


class ServerLoop:
    """Sockets and the loop around one :class:`Service`."""

    def __init__(self, config: LoopConfig, engine: Any, devices: tuple[int, ...]) -> None:
        self.config = config
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.service = Service(engine, devices=devices, client_timeout_s=config.client_timeout_s, wake=self.wake)
        self._stop_requested = False
        self.ctx = zmq.Context()
        self.router: zmq.Socket | None = None
        self.bound: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------------

    def bind(self) -> list[str]:
        """Bind the IPC endpoint (mode 0600) and the TCP address; returns what was bound."""
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 500)  # on close, let the last replies out briefly
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable push raises: we keep it instead
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client's new socket takes over its session
        router.setsockopt(zmq.MAXMSGSIZE, P.ZMQ_MAX_MESSAGE_BYTES)
        path = ipc_path(self.config.endpoint)
        if path is not None:
            _claim_ipc_path(path)
            old = os.umask(0o177)  # the socket file is created 0600: no window with wider access
            try:
                router.bind(self.config.endpoint)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
        else:
            router.bind(self.config.endpoint)
        self.bound = [self.config.endpoint]
        if self.config.tcp:
            router.bind(self.config.tcp)
            self.bound.append(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        self.router = router
        return self.bound

    def wake(self) -> None:
        """Thread- and signal-safe: make the loop look at its queues now."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def request_stop(self, *_: object) -> None:
        """Signal handler: stop serving (the loop finishes the shutdown)."""
        self._stop_requested = True
        self.wake()

    def run(self) -> None:
        """Serve until a stop request, then shut down cleanly."""
        assert self.router is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        service = self.service
        period = service.heartbeat_s
        next_sweep = time.monotonic() + period
        drain_deadline = None
        while True:
            timeout_ms = max(0, int((next_sweep - time.monotonic()) * 1000)) + 1
            events = dict(poller.poll(timeout_ms))
            if self.router in events:
                self._serve_batch()
            if self._wake_r in events:
                _drain_pipe(self._wake_r)
            self._push(service.completions())
            now = time.monotonic()
            if now >= next_sweep:
                service.sweep(now)
                next_sweep = now + period
            if self._stop_requested and drain_deadline is None:
                logger.info("stopping: refusing new requests, %d transfer(s) in flight", len(service.jobs))
                service.stopping = True
                drain_deadline = now + self.config.drain_timeout_s
            if drain_deadline is not None:
                if not service.jobs:
                    break
                if now >= drain_deadline:
                    logger.warning("%d transfer(s) still in flight after %.1f s: reporting them failed",
                                   len(service.jobs), self.config.drain_timeout_s)
                    self._push(service.fail_inflight("the server shut down before this transfer completed"))
                    break
                next_sweep = min(next_sweep, now + 0.05)  # poll the drain often
        self._shutdown()

    def _shutdown(self) -> None:
        service = self.service
        service.close_all()
        try:
            service.engine.close()
        except Exception:
            logger.exception("engine.close() failed")
        assert self.router is not None
        self.router.close()
        self.ctx.term()
        path = ipc_path(self.config.endpoint)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)
        logger.info("server stopped")

    # ---- the work -----------------------------------------------------------------------------

    def _serve_batch(self) -> None:
        router, service = self.router, self.service
        assert router is not None
        for _ in range(_BATCH):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = parts[0]
            now = time.monotonic()
            if len(parts) != 2:
                service.counters.errors[P.BAD_MESSAGE] += 1
                reply = P.error_reply(None, P.BAD_MESSAGE, f"one frame per message, got {len(parts) - 1}")
            else:
                reply = service.handle_frame(identity, parts[1], now)
            if reply is not None:
                self._send(identity, reply, keep=False)
            pending = service.take_pending(identity)
            if pending:
                self._push([(identity, frame) for frame in pending])

    def _push(self, items: list[tuple[bytes, bytes]]) -> None:
        for identity, frame in items:
            self._send(identity, frame, keep=True)

    def _send(self, identity: bytes, frame: bytes, keep: bool) -> None:
        assert self.router is not None
        try:
            self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            if keep:
                logger.debug("push to %r deferred: %s", identity, exc)
                self.service.defer(identity, frame)  # delivered when the client talks again
            else:
                logger.debug("reply to %r dropped: its socket is gone", identity)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _claim_ipc_path(path: str) -> None:
    """Refuse to start over a live server's socket; remove a dead one's stale file."""
    if not os.path.exists(path):
        directory = os.path.dirname(path)
        if directory and not os.path.isdir(directory):
            raise ValueError(f"the directory of the IPC endpoint does not exist: {directory}")
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale file from a killed server
        logger.info("removed a stale IPC socket file %s", path)
        return
    finally:
        probe.close()
    raise ValueError(f"another server is listening on {path}")
