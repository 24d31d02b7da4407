"""The server's event loop: one thread owns the ROUTER socket.

It blocks in one ``recv`` on the ROUTER (bounded by RCVTIMEO: the sweep period, or
``TOUCH_IDLE_MS`` while queries' LRU refreshes wait to be applied: they are applied when
that receive times out), answers requests through :class:`Service`, pushes completions, and
sweeps silent sessions every heartbeat period. Engine threads (completions) and the signal
handler wake it with a frame on an inproc DEALER connected to the same ROUTER, so without a
fast lane the hot path is one recv and one send per request: no poller, no pipe. With an
ipc:// endpoint the loop also serves a fast lane (``protocol.FAST_SUFFIX``): saves and loads that clients send as
Unix datagrams, which wake this thread directly; it then waits on both in one poll, and reads
the datagrams waiting before each ROUTER message (a client's datagram, sent before its next
ZMQ message, is served first). After a message, while no
transfer is in flight, the loop first busy-polls its socket for ``spin_s`` (``--spin-us``):
a request that follows within that window is read without the thread going to sleep and
waking again. A stop request (SIGINT/SIGTERM) makes
new requests fail with ``shutting_down``, lets transfers in flight finish for up to
``drain_timeout_s`` (then reports them failed), closes every registration, closes the
engine, removes the IPC socket file and returns.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from pegaflow.server import exposure
from pegaflow.server import protocol as P
from pegaflow.server.service import TOUCH_IDLE_MS, Service

logger = logging.getLogger(__name__)

# The identity of the loop's own wake-up socket (a client's session id starts with b"P").
_WAKE_IDENTITY = b"\xffpegaflow-wake"
_WAKE_ENDPOINT = "inproc://pegaflow-wake"
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_LAST = int(zmq.NOBLOCK)
_RCVTIMEO, _EVENTS, _POLLIN = int(zmq.RCVTIMEO), int(zmq.EVENTS), int(zmq.POLLIN)


_FAST_ONLY = object()  # _receive_both: datagrams served, no ROUTER message
_PEEK_NOWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT
_TRUNC_NOWAIT = socket.MSG_TRUNC | socket.MSG_DONTWAIT  # recv_into returns a datagram's full length

MAX_SPIN_S = 0.01  # a longer window burns a core for nothing: requests that far apart find the loop asleep


@dataclass(frozen=True)
class LoopConfig:
    """Where to listen and how long to wait for clients."""

    endpoint: str  # ipc://PATH (or any ZMQ endpoint)
    tcp: str | None  # tcp://HOST:PORT; port 0 picks a free one
    client_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    allow_remote: bool = False  # may listen beyond loopback (needs auth_token too)
    auth_token: str | None = field(default=None, repr=False)  # every hello must present it
    # Busy-poll window after each message while no transfer is in flight (0: always block).
    # On the dev machine a 1,000-hash query went from 1.25-1.38x a blocking echo's round trip
    # to 0.78-1.09x with 200 us (bench/NOTES.md, session 10). 2 ms since 2026-12-07: on an
    # H100 host (bench/e2e.py, two interleaved rounds) a lone 1-block load's overhead p50 went
    # from 296-438 to 231-241 us and a 64-block load's from 646-716 to 579-594 us against
    # 200 us, as requests that follow a worker's own work (its checks, its forward) still find
    # the loop awake (bench/NOTES.md, session 17). Not while transfers run: the spinning
    # thread holds the GIL that their completion threads need.
    spin_s: float = 2e-3

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or "://" not in self.endpoint:
            raise ValueError(f"endpoint must look like ipc:///tmp/pega_engine.sock, got {self.endpoint!r}")
        if self.tcp is not None and not self.tcp.startswith("tcp://"):
            raise ValueError(f"tcp must look like tcp://127.0.0.1:50055, got {self.tcp!r}")
        if not self.client_timeout_s > 0:
            raise ValueError(f"client_timeout_s must be > 0, got {self.client_timeout_s!r}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s!r}")
        if not 0 <= self.spin_s <= MAX_SPIN_S:
            raise ValueError(f"spin_s must be in [0, {MAX_SPIN_S}] seconds, got {self.spin_s!r}")
        if self.auth_token is not None:
            exposure.check_token(self.auth_token, "auth_token")
        exposure.check_exposure([self.endpoint, *([self.tcp] if self.tcp else [])], self.allow_remote,
                                self.auth_token)


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
        self.service = Service(engine, devices=devices, client_timeout_s=config.client_timeout_s, wake=self.wake,
                               auth_token=config.auth_token)
        self.service.push = self._push
        self.service.input_waiting = self._input_waiting
        self._stop_requested = False
        self.ctx = zmq.Context()
        self.router: zmq.Socket | None = None
        self.bound: list[str] = []
        self._waker: zmq.Socket | None = None
        self._wake_lock = threading.RLock()  # re-entrant: the signal handler may interrupt its holder
        self._wake_pending = False
        self.fast: socket.socket | None = None  # the fast lane (None: no ipc endpoint)
        self._fast_buffer = bytearray(P.FAST_MAX_BYTES + P.SESSION_BYTES)

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
        if path is not None:
            try:
                self.fast = _bind_fast(path + P.FAST_SUFFIX)
                self.service.fast_path = path + P.FAST_SUFFIX
            except OSError as exc:  # e.g. a path past the 107 bytes a Unix socket may have
                logger.warning("no fast lane at %s%s (%s): transfers come by ZMQ only", path, P.FAST_SUFFIX, exc)
        self.bound = [self.config.endpoint]
        if self.config.tcp:
            router.bind(self.config.tcp)
            self.bound.append(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        router.bind(_WAKE_ENDPOINT)
        waker = self.ctx.socket(zmq.DEALER)
        waker.setsockopt(zmq.IDENTITY, _WAKE_IDENTITY)
        waker.setsockopt(zmq.LINGER, 0)
        waker.connect(_WAKE_ENDPOINT)
        self._waker = waker
        self.router = router
        if self.fast is not None:
            self._poller = zmq.Poller()
            self._poller.register(router, zmq.POLLIN)
            self._poller.register(self.fast.fileno(), zmq.POLLIN)  # the poll names it by this fd
        return self.bound

    def wake(self) -> None:
        """Thread-safe: make the loop look at its queues now (one wake frame in flight at most)."""
        with self._wake_lock:
            if self._wake_pending or self._waker is None:
                return
            self._wake_pending = True
            self._waker.send(b"", zmq.NOBLOCK)

    def request_stop(self, *_: object) -> None:
        """Signal handler: stop serving (the loop finishes the shutdown)."""
        self._stop_requested = True
        self.wake()

    def run(self) -> None:
        """Serve until a stop request, then shut down cleanly."""
        router, service = self.router, self.service
        assert router is not None, "bind() first"
        service.loop_thread = threading.get_ident()
        period = service.heartbeat_s
        sweep_ms = max(1, int(period * 1000))
        rcvtimeo = sweep_ms
        router.setsockopt(zmq.RCVTIMEO, rcvtimeo)
        next_sweep = time.monotonic() + period
        drain_deadline = None
        spin_s, spin = self.config.spin_s, False
        clock = time.perf_counter
        while True:
            # Pending LRU refreshes: wait TOUCH_IDLE_MS in the receive itself, then apply them.
            want = TOUCH_IDLE_MS if service.touches_pending else sweep_ms if drain_deadline is None else 50
            if want != rcvtimeo:
                router.setsockopt(_RCVTIMEO, want)
                rcvtimeo = want
            if spin and not service.jobs:
                end = clock() + spin_s
                while not router.getsockopt(_EVENTS) & _POLLIN and clock() < end and not self._fast_waiting():
                    pass
            try:
                parts = router.recv_multipart() if self.fast is None else self._receive_both(rcvtimeo)
            except zmq.Again:
                parts = None  # idle for TOUCH_IDLE_MS or a sweep period
                if service.touches_pending:
                    service.apply_idle_touches()
            spin = parts is not None and spin_s > 0  # after a timeout (idle) the loop just blocks again
            if parts is _FAST_ONLY:
                parts = None
            elif parts is not None:
                identity = parts[0]
                try:
                    if identity == _WAKE_IDENTITY:
                        with self._wake_lock:
                            self._wake_pending = False
                        self._push(service.completions())
                    else:
                        self._serve(identity, parts)
                except Exception:  # a bug: log it and keep serving the other clients
                    logger.exception("failed to serve a message from %r", identity)
            now = time.monotonic()
            if now >= next_sweep:
                self._push(service.completions())
                service.sweep(now)
                next_sweep = now + period
            if self._stop_requested:
                if drain_deadline is None:
                    logger.info("stopping: refusing new requests, %d transfer(s) in flight", len(service.jobs))
                    service.stopping = True
                    drain_deadline = now + self.config.drain_timeout_s  # then RCVTIMEO 50 ms: look often
                self._push(service.completions())
                if not service.jobs:
                    break
                if now >= drain_deadline:
                    logger.warning("%d transfer(s) still in flight after %.1f s: reporting them failed",
                                   len(service.jobs), self.config.drain_timeout_s)
                    self._push(service.fail_inflight("the server shut down before this transfer completed"))
                    break
        self._shutdown()

    def _shutdown(self) -> None:
        service = self.service
        service.close_all()
        try:
            service.engine.close()
        except Exception:
            logger.exception("engine.close() failed")
        assert self.router is not None and self._waker is not None
        with self._wake_lock:
            self._waker.close()
            self._waker = None
        self.router.close()
        self.ctx.term()
        path = ipc_path(self.config.endpoint)
        if path is not None:
            for name in (path, path + P.FAST_SUFFIX):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        if self.fast is not None:
            self.fast.close()
        logger.info("server stopped")

    # ---- the work -----------------------------------------------------------------------------

    def _serve(self, identity: bytes, parts: list[bytes]) -> None:
        service = self.service
        if len(parts) != 2:
            service.counters.errors[P.BAD_MESSAGE] += 1
            reply = P.error_reply(None, P.BAD_MESSAGE, f"one frame per message, got {len(parts) - 1}")
        else:
            reply = service.handle_frame(identity, parts[1], time.monotonic())
        if reply is not None:
            self._send(identity, reply, keep=False)
        service.start_deferred()  # a transfer done at once is pushed from its start (Service._start)
        pending = service.take_pending(identity)
        if pending:
            self._push([(identity, frame) for frame in pending])

    def _input_waiting(self) -> bool:
        """Whether a message waits on the ROUTER (or the fast lane) now."""
        return bool(self.router.getsockopt(_EVENTS) & _POLLIN) or self._fast_waiting()

    def _fast_waiting(self) -> bool:
        fast = self.fast
        if fast is None:
            return False
        try:
            return bool(fast.recv(1, _PEEK_NOWAIT))
        except (BlockingIOError, InterruptedError):
            return False

    def _receive_both(self, timeout_ms: int) -> list[bytes] | object:
        """The next ROUTER message, after serving every datagram already waiting; blocks in one
        poll on both (up to ``timeout_ms``). ``_FAST_ONLY``: datagrams were served, no message;
        ``zmq.Again``: nothing came."""
        router = self.router
        served = self._serve_fast()
        if not router.getsockopt(_EVENTS) & _POLLIN:
            if served:
                return _FAST_ONLY
            ready = self._poller.poll(timeout_ms)
            if not ready:
                raise zmq.Again()
            # Look at the lane again only if the poll says it has something (a read that finds
            # nothing is a failed syscall and an exception on every ZMQ message).
            fd = self.fast.fileno()
            if any(sock == fd for sock, _ in ready) and self._serve_fast() \
                    and not router.getsockopt(_EVENTS) & _POLLIN:
                return _FAST_ONLY
        try:
            return router.recv_multipart(_SEND_LAST)  # NOBLOCK
        except zmq.Again:
            return _FAST_ONLY if served else None

    def _serve_fast(self) -> int:
        """Serve every datagram waiting on the fast lane; how many there were."""
        fast, buffer, served = self.fast, self._fast_buffer, 0
        while True:
            try:
                size = fast.recv_into(buffer, len(buffer), _TRUNC_NOWAIT)
            except (BlockingIOError, InterruptedError):
                return served
            served += 1
            identity = bytes(buffer[:P.SESSION_BYTES])
            if size > len(buffer) or size <= P.SESSION_BYTES:
                self.service.counters.errors[P.BAD_MESSAGE] += 1
                logger.debug("dropped a fast-lane datagram of %d bytes", size)
                continue
            # Served as if it came by ZMQ from that session: a session the server does not know
            # (restarted, expired) gets its no_session error at once, not a client timeout.
            self.service.counters.fast_messages += 1
            try:
                self._serve(identity, [identity, bytes(buffer[P.SESSION_BYTES:size])])
            except Exception:  # a bug: log it and keep serving the other clients
                logger.exception("failed to serve a fast-lane message from %r", identity)

    def _push(self, items: list[tuple[bytes, bytes]]) -> None:
        for identity, frame in items:
            self._send(identity, frame, keep=True)

    def _send(self, identity: bytes, frame: bytes, keep: bool) -> None:
        assert self.router is not None
        try:
            # Two plain sends with int flags: send_multipart's enum arithmetic cost as much again.
            self.router.send(identity, _SEND_MORE)
            self.router.send(frame, _SEND_LAST)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                logger.error("send to %r failed: %s", identity, exc)  # never a reason to stop serving
            if keep:
                logger.debug("push to %r deferred: %s", identity, exc)
                self.service.defer(identity, frame)  # delivered when the client talks again
            else:
                logger.debug("reply to %r dropped: its socket is gone", identity)


def _bind_fast(path: str) -> socket.socket:
    """The fast lane's datagram socket, mode 0600 (the ipc endpoint was claimed first, so a
    file here is a dead server's)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # capped by net.core.rmem_max
    except OSError:
        pass
    return sock


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
