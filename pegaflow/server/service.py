"""The server's operations on top of the engine, without sockets.

:meth:`Service.handle_frame` takes one raw frame from a client and returns the reply frame
(or None): it decodes and validates the request, checks it against the sessions, instances
and registrations, and only then calls the engine. The engine's completion callbacks queue the
result; from an engine thread they also wake the loop, which calls :meth:`Service.completions`
from its own thread. A transfer that completes on the loop's thread itself (a small CPU copy)
wakes nothing: the loop pushes its completion right after serving the request. Everything
else runs on the loop's thread, so no locks.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pegaflow.engine.index import split_hashes
from pegaflow.server import exposure
from pegaflow.server import protocol as P
from pegaflow.server.sessions import MAX_EVENTS_PER_SESSION, Job, Registration, Session

logger = logging.getLogger(__name__)

# Ops a client may send before its hello: read-only and liveness.
_SESSIONLESS = (P.Hello, P.Health, P.Stats, P.Heartbeat)
# Expired sessions whose lost job ids are kept for a hello that may come back.
MAX_LOST_SESSIONS = 1024
# Query hits' LRU refreshes wait in the index's log until the loop has been idle this long
# after a reply (a request that comes sooner finds the CPU free: on a busy 2-core machine,
# refreshes run at once after the reply delayed the next request by as much), then are
# applied this many at a time between looks at the socket (~4-7 us a slice on the dev
# machine): a request that comes meanwhile waits for one slice at most. The loop waits in its
# blocking receive (RCVTIMEO), not in a poll before it: a poll then a receive cost ~25 us more
# per request on the dev machine, and kept the CPU from the sockets' I/O threads.
TOUCH_IDLE_MS = 1
TOUCH_SLICE = 128
# Beyond this many pending refreshes (a server too busy to idle for TOUCH_IDLE_MS), the excess
# is applied after every reply, so the index's own bound (64k: ~10 ms at once in an index of
# 200k entries) is not what drains the log.
TOUCH_BACKLOG = 8192


@dataclass
class Counters:
    """What the metrics report; plain ints updated on the loop's thread, read at scrape."""

    queries: int = 0
    hashes_queried: int = 0
    hits: int = 0
    misses: int = 0
    transfers: dict[str, int] = field(default_factory=lambda: {"save": 0, "load": 0})
    failed: dict[str, int] = field(default_factory=lambda: {"save": 0, "load": 0})
    blocks: dict[str, int] = field(default_factory=lambda: {"save": 0, "load": 0})
    nbytes: dict[str, int] = field(default_factory=lambda: {"save": 0, "load": 0})
    fast_messages: int = 0  # transfers that came by the fast lane (protocol.FAST_SUFFIX)
    board_notices: int = 0  # completions also marked on a client's board (an engine thread's += : a metric)
    seconds: dict[str, float] = field(default_factory=lambda: {"save": 0.0, "load": 0.0})
    last_gbps: dict[str, float] = field(default_factory=lambda: {"save": 0.0, "load": 0.0})
    skipped_blocks: int = 0
    missing_blocks: int = 0
    sessions_expired: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)


class Service:
    """Sessions, instances and registrations around one engine."""

    def __init__(self, engine: Any, *, devices: tuple[int, ...], client_timeout_s: float,
                 wake: Callable[[], None] = lambda: None, auth_token: str | None = None) -> None:
        self.engine = engine
        # With a secret, a hello must present it, and nothing but hello and heartbeat is served
        # to a client without a session (health and stats included).
        self._auth_token = auth_token.encode("utf-8") if auth_token is not None else None
        self.devices = devices  # () = CPU mode
        self.client_timeout_s = client_timeout_s
        self.heartbeat_s = client_timeout_s / 4
        self.started = time.monotonic()
        self.stopping = False
        self.counters = Counters()
        self.sessions: dict[bytes, Session] = {}
        self.instances: dict[str, Any] = {}  # instance_id -> engine InstanceSpec
        self.namespaces: dict[str, str] = {}  # instance_id -> namespace (spec.namespace hashes on each read)
        self.registrations: dict[tuple[str, int], Registration] = {}
        self.jobs: dict[tuple[bytes, int], Job] = {}
        self.open_mappings = 0
        self._lost_jobs: dict[bytes, list[int]] = {}  # expired sessions' jobs in flight, by identity
        self._wake = wake
        self.push: Callable[[list[tuple[bytes, bytes]]], None] | None = None  # set by the loop: send these now
        self.fast_path = ""  # set by the loop: its fast lane's datagram socket (protocol.FAST_SUFFIX), if bound
        # The thread that serves (the one that built the service; the loop sets it when it
        # runs): a completion on it needs no wake-up.
        self.loop_thread = threading.get_ident()
        self._done: collections.deque = collections.deque()  # appended from engine threads
        self._deferred: collections.deque = collections.deque()  # transfers accepted, to start
        self._touches_logged = False  # queries' LRU refreshes left in the index's log
        # Set by the loop: whether a message waits on the socket now. Without it,
        # start_deferred applies the refreshes at once.
        self.input_waiting: Callable[[], bool] | None = None
        self._handlers: dict[type, Callable] = {
            P.Hello: self._hello, P.Heartbeat: self._heartbeat, P.Bye: self._bye,
            P.RegisterInstance: self._register_instance, P.RegisterKV: self._register_kv,
            P.UnregisterKV: self._unregister_kv, P.Query: self._query, P.Transfer: self._transfer,
            P.Unregister: self._unregister, P.Reset: self._reset, P.Stats: self._stats, P.Health: self._health,
        }

    @property
    def cpu_mode(self) -> bool:
        return not self.devices

    # ---- entry points for the loop ------------------------------------------------------------

    def handle_frame(self, identity: bytes, frame: bytes, now: float) -> bytes | None:
        """The reply to one frame (None for heartbeat, bye and a transfer accepted without ack). Never raises."""
        request = None
        if self._done and self.push is not None:
            # A client that saw a transfer done on its board may act on it (reuse the job id,
            # unregister its cache) before this loop has taken the completion: take it first.
            self.push(self.completions())
        try:
            request = P.decode_request(frame)
            session = self.sessions.get(identity)
            if session is not None:
                session.last_seen = now
            elif self._auth_token is not None and type(request) not in (P.Hello, P.Heartbeat):
                raise P.ProtocolError(P.UNAUTHORIZED, "this server needs a shared secret: send hello with "
                                      "its token first (PEGAFLOW_AUTH_TOKEN)")
            elif type(request) not in _SESSIONLESS:
                raise P.ProtocolError(P.NO_SESSION, "no session: send hello first (or the session expired)")
            if self.stopping and type(request) not in (P.Health, P.Stats, P.Heartbeat, P.Bye):
                raise P.ProtocolError(P.SHUTTING_DOWN, "the server is shutting down")
            return self._handlers[type(request)](identity, session, request, now)
        except P.ProtocolError as exc:
            self.counters.errors[exc.code] += 1
            request_id = exc.request_id if exc.request_id is not None else getattr(request, "id", None)
            return P.error_reply(request_id, exc.code, exc.message)
        except Exception as exc:  # a bug or an engine failure: answer, log, keep serving
            logger.exception("request from %r failed", identity)
            self.counters.errors[P.INTERNAL] += 1
            return P.error_reply(getattr(request, "id", None), P.INTERNAL, f"{type(exc).__name__}: {exc}")

    @property
    def has_completions(self) -> bool:
        return bool(self._done)

    def completions(self) -> list[tuple[bytes, bytes]]:
        """(identity, frame) of each finished job, for sessions still alive."""
        out = []
        while self._done:
            session_id, job_id, result, finished = self._done.popleft()
            job = self.jobs.pop((session_id, job_id), None)
            if job is None:
                continue
            self._job_finished(job, result, finished)
            session = self.sessions.get(session_id)
            if session is not None and session is job.owner:
                session.jobs.discard(job_id)
                out.append((session_id, _completion_frame(job, result)))
        return out

    def take_pending(self, identity: bytes) -> list[bytes]:
        session = self.sessions.get(identity)
        if session is None or not session.pending:
            return []
        out = list(session.pending)
        session.pending.clear()
        return out

    def defer(self, identity: bytes, frame: bytes) -> None:
        """Keep a push the socket could not deliver until the client talks again."""
        session = self.sessions.get(identity)
        if session is not None:
            session.pending.append(frame)

    def sweep(self, now: float) -> None:
        """Expire sessions silent for longer than the client timeout."""
        limit = now - self.client_timeout_s
        for identity in [i for i, s in self.sessions.items() if s.last_seen < limit]:
            session = self.sessions[identity]
            logger.warning("client %s (pid %s) silent for %.1f s: releasing its %d registration(s)",
                           session.name, session.pid, now - session.last_seen, len(session.registrations))
            self.counters.sessions_expired += 1
            self._end_session(identity, expired=True)

    def fail_inflight(self, reason: str) -> list[tuple[bytes, bytes]]:
        """Shutdown past its drain deadline: report every job still running as failed."""
        from pegaflow.engine import TransferResult

        now = time.monotonic()
        for (session_id, job_id) in list(self.jobs):
            self._done.append((session_id, job_id, TransferResult(ok=False, num_blocks=0, nbytes=0, error=reason), now))
        return self.completions()

    def close_all(self) -> None:
        """Shutdown: end every session and close every registration."""
        for identity in list(self.sessions):
            self._end_session(identity)
        for registration in list(self.registrations.values()):
            registration.inflight = 0
            self._finalize(registration)

    # ---- handlers -----------------------------------------------------------------------------

    def _hello(self, identity: bytes, session: Session | None, req: P.Hello, now: float) -> bytes:
        if req.version != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                P.VERSION_MISMATCH,
                f"client speaks protocol {req.version}, this server speaks {P.PROTOCOL_VERSION}: "
                "run the same pegaflow version on both sides",
                req.id,
            )
        if self._auth_token is not None and not exposure.token_matches(self._auth_token, req.token):
            if self.counters.errors[P.UNAUTHORIZED] % 1000 == 0:  # the first, then one in 1000: no log flood
                logger.warning("hello from %s (pid %d) refused: %s auth token (%d refused so far)", req.name,
                               req.pid, "wrong" if req.token else "no", self.counters.errors[P.UNAUTHORIZED] + 1)
            raise P.ProtocolError(P.UNAUTHORIZED, "wrong or missing auth token (set PEGAFLOW_AUTH_TOKEN to the "
                                  "server's secret)", req.id)
        resumed = session is not None
        lost_jobs = self._lost_jobs.pop(identity, [])
        if session is None:
            session = Session(identity=identity, pid=req.pid, name=req.name, last_seen=now)
            self.sessions[identity] = session
            logger.info("client %s (pid %d) connected", req.name, req.pid)
        session.pid, session.name = req.pid, req.name
        board = self._map_board(session, req)
        import pegaflow

        return P.ok_reply(
            req.id, version=P.PROTOCOL_VERSION, server=pegaflow.__version__, cpu_mode=self.cpu_mode,
            devices=list(self.devices), heartbeat_s=self.heartbeat_s, client_timeout_s=self.client_timeout_s,
            max_message_bytes=P.MAX_MESSAGE_BYTES, resumed=resumed, lost_jobs=lost_jobs, board=board,
            fast=self.fast_path,
        )

    def _map_board(self, session: Session, req: P.Hello) -> str:
        """Map the completion board the client offers: "new" (mapped now), "kept" (a resumed
        session keeps the one it has, which the client still reads) or "" (none: every
        completion then comes by push alone, as without a board)."""
        if session.board is not None:
            return "kept"
        if not req.board:
            return ""
        from pegaflow.board import ServerBoard

        try:
            session.board = ServerBoard(req.board)
        except (OSError, ValueError) as exc:
            logger.warning("client %s (pid %d): no completion board (%s); completions come by push only",
                           req.name, req.pid, exc)
            return ""
        return "new"

    def _heartbeat(self, identity: bytes, session: Session | None, req: P.Heartbeat, now: float) -> None:
        target = self.sessions.get(req.session)
        if target is not None:
            target.last_seen = now
        return None

    def _bye(self, identity: bytes, session: Session | None, req: P.Bye, now: float) -> None:
        self._end_session(identity)
        return None

    def _register_instance(self, identity: bytes, session: Session, req: P.RegisterInstance, now: float) -> bytes:
        from pegaflow.engine import InstanceSpec

        spec = InstanceSpec(
            instance_id=req.instance_id, model=req.model, kv_dtype=req.kv_dtype, layout=req.layout,
            block_size=req.block_size, page_bytes=req.page_bytes, tp_size=req.tp_size,
            replicated=req.replicated, hash_bytes=req.hash_bytes,
        )
        known = self.instances.get(req.instance_id)
        if known is not None:
            if known != spec:
                raise P.ProtocolError(P.INSTANCE_CONFLICT,
                                      f"instance {req.instance_id!r} is registered with another geometry", req.id)
            return P.ok_reply(req.id, namespace=self.namespaces[req.instance_id])
        try:
            namespace = self.engine.register_instance(spec)
        except ValueError as exc:
            raise P.ProtocolError(P.INSTANCE_CONFLICT, str(exc), req.id) from None
        self.instances[req.instance_id] = spec
        self.namespaces[req.instance_id] = namespace
        logger.info("instance %s registered: %s, %d region(s), %d bytes per block, tp %d",
                    req.instance_id, namespace, len(spec.page_bytes), spec.block_bytes, spec.tp_size)
        return P.ok_reply(req.id, namespace=namespace)

    def _register_kv(self, identity: bytes, session: Session, req: P.RegisterKV, now: float) -> bytes:
        from pegaflow import sharing
        from pegaflow.kernels import KVRegions, Region

        spec = self._instance(req.instance_id, req.id)
        if req.rank >= spec.tp_size:
            raise P.ProtocolError(P.BAD_FIELD, f"rank {req.rank} is not below tp_size {spec.tp_size}", req.id)
        pages = tuple(r[2] for r in req.regions)
        if pages != spec.page_bytes:
            raise P.ProtocolError(P.BAD_FIELD, f"region page sizes {_short(pages)} differ from the instance's "
                                  f"page_bytes {_short(spec.page_bytes)}", req.id)
        existing = self.registrations.get((req.instance_id, req.rank))
        if existing is not None:
            if existing.session != identity:
                owner = self.sessions.get(existing.session)
                who = f"client {owner.name} (pid {owner.pid})" if owner else "a departed client"
                raise P.ProtocolError(P.ALREADY_REGISTERED, f"rank {req.rank} of {req.instance_id!r} is registered "
                                      f"by {who}; a silent client expires after {self.client_timeout_s} s", req.id)
            if existing.inflight:
                raise P.ProtocolError(P.ALREADY_REGISTERED, f"rank {req.rank} of {req.instance_id!r} has "
                                      f"{existing.inflight} transfer(s) in flight; retry after their completions",
                                      req.id)
        try:
            share = sharing.handle_from_wire(req.storage)
        except ValueError as exc:
            raise P.ProtocolError(P.BAD_FIELD, str(exc), req.id) from None
        device = None
        if isinstance(share, sharing.CudaShare):
            if self.cpu_mode:
                raise P.ProtocolError(P.SHARE_FAILED, "this server runs in CPU mode: it cannot open a CUDA "
                                      "storage", req.id)
            try:
                device = sharing.local_device(share, self.devices)
            except ValueError as exc:
                raise P.ProtocolError(P.SHARE_FAILED, str(exc), req.id) from None
        try:
            storage = sharing.open_storage(share, device)
        except Exception as exc:  # torch raises RuntimeError for handles it cannot open
            raise P.ProtocolError(P.SHARE_FAILED, f"cannot open the shared storage: {exc}", req.id) from None
        try:
            owner = sharing.storage_bytes_tensor(storage)
            kv = KVRegions(tuple(Region(owner, o, s, p) for o, s, p in req.regions), req.num_blocks)
        except ValueError as exc:
            raise P.ProtocolError(P.BAD_FIELD, str(exc), req.id) from None
        if existing is not None:  # the same client registers again: the new cache replaces the old
            self._close_registration(existing)
        try:
            self.engine.register_kv(req.instance_id, req.rank, kv, device=device)
        except ValueError as exc:
            raise P.ProtocolError(P.BAD_FIELD, str(exc), req.id) from None
        registration = Registration(
            instance_id=req.instance_id, rank=req.rank, session=identity, share=share, storage=storage,
            num_blocks=req.num_blocks, block_bytes=kv.block_bytes, device=device,
        )
        self.registrations[registration.key] = registration
        session.registrations.add(registration.key)
        self.open_mappings += 1
        logger.info("rank %d of %s registered by %s: %d blocks of %d bytes on %s", req.rank, req.instance_id,
                    session.name, req.num_blocks, kv.block_bytes, "cpu" if device is None else f"cuda:{device}")
        return P.ok_reply(req.id, block_bytes=kv.block_bytes)

    def _unregister_kv(self, identity: bytes, session: Session, req: P.UnregisterKV, now: float) -> bytes:
        registration = self._registration(identity, req.instance_id, req.rank, req.id)
        self._close_registration(registration)
        return P.ok_reply(req.id)

    def _query(self, identity: bytes, session: Session, req: P.Query, now: float) -> bytes:
        spec = self.instances.get(req.instance_id)
        if spec is None:
            raise P.ProtocolError(P.UNKNOWN_INSTANCE, f"unknown instance {req.instance_id!r}", req.id)
        count, rest = divmod(len(req.hashes), spec.hash_bytes)
        if req.hash_bytes != spec.hash_bytes:
            raise P.ProtocolError(P.BAD_HASH, f"hashes of {req.hash_bytes} bytes: instance {req.instance_id!r} "
                                  f"uses {spec.hash_bytes}", req.id)
        if rest or count > P.MAX_HASHES_PER_OP:
            raise P.ProtocolError(P.BAD_HASH, f"{len(req.hashes)} bytes of hashes are not at most "
                                  f"{P.MAX_HASHES_PER_OP} hashes of {spec.hash_bytes} bytes", req.id)
        # The blob is a whole number of hashes (checked above): ask the engine's index directly,
        # which splits and looks them up in C, without engine.query's pass over every hash.
        index = self.engine.index
        hits = index.query_blob(self.namespaces[req.instance_id], req.hashes, spec.hash_bytes)
        if hits:  # the hits' LRU refresh: once the reply is out, while nothing waits (apply_idle_touches)
            self._touches_logged = True
        counters = self.counters
        counters.queries += 1
        counters.hashes_queried += count
        counters.hits += hits
        counters.misses += count - hits
        return P.ok_reply(req.id, hits=hits)

    def _transfer(self, identity: bytes, session: Session, req: P.Transfer, now: float) -> bytes:
        spec = self._instance(req.instance_id, req.id)
        registration = self._registration(identity, req.instance_id, req.rank, req.id)
        count = len(req.block_ids)
        if req.hash_bytes != spec.hash_bytes:
            raise P.ProtocolError(P.BAD_HASH, f"hashes of {req.hash_bytes} bytes: instance {req.instance_id!r} "
                                  f"uses {spec.hash_bytes}", req.id)
        if len(req.hashes) != count * spec.hash_bytes:
            raise P.ProtocolError(P.BAD_HASH, f"{len(req.hashes)} bytes of hashes for {count} blocks: expected "
                                  f"{count} hashes of {spec.hash_bytes} bytes", req.id)
        if count and max(req.block_ids) >= registration.num_blocks:
            raise P.ProtocolError(P.OUT_OF_RANGE, f"block id {max(req.block_ids)} is out of range: rank "
                                  f"{req.rank} registered {registration.num_blocks} blocks", req.id)
        if req.op == "load" and len(set(req.block_ids)) != count:
            raise P.ProtocolError(P.BAD_FIELD, "block_ids of a load must not repeat", req.id)
        if (identity, req.job_id) in self.jobs:  # this session's, or a lost one of its expired predecessor
            raise P.ProtocolError(P.DUPLICATE_JOB, f"job {req.job_id} is already in flight", req.id)
        event = self._event(session, registration, req.event, req.id) if req.event is not None else None
        self.jobs[(identity, req.job_id)] = Job(identity, req.job_id, req.op, registration, now, owner=session)
        session.jobs.add(req.job_id)
        registration.inflight += 1
        # Every check is done: accept now and start the copy once the reply is out. In CPU mode
        # the copy holds the GIL; started first, it delayed the acceptance by its whole length.
        board = session.board if req.notify else None
        self._deferred.append(partial(self._start, identity, req, spec.hash_bytes, event, board))
        return P.ok_reply(req.id, job_id=req.job_id) if req.ack else None

    def start_deferred(self) -> None:
        """Start the transfers accepted by the last reply (the loop calls it after sending).

        The queries' LRU refreshes stay logged (beyond ``TOUCH_BACKLOG`` the excess is applied
        now): the loop applies them with :meth:`apply_idle_touches` once its socket has been
        idle ``TOUCH_IDLE_MS``. Without a loop (``input_waiting`` unset) they are applied at once.
        """
        while self._deferred:
            self._deferred.popleft()()
        if self._touches_logged:
            index = self.engine.index
            excess = index.pending_touches() - TOUCH_BACKLOG
            if excess > 0:
                index.apply_touches(excess)
            if self.input_waiting is None:
                self.apply_idle_touches()

    @property
    def touches_pending(self) -> bool:
        """Queries' LRU refreshes wait to be applied (the loop then waits ``TOUCH_IDLE_MS`` at most)."""
        return self._touches_logged

    def apply_idle_touches(self) -> None:
        """Apply the logged LRU refreshes slice by slice until a message waits on the socket."""
        index, waiting = self.engine.index, self.input_waiting
        while index.apply_touches(TOUCH_SLICE):
            if waiting is not None and waiting():
                return
        self._touches_logged = False

    def _start(self, identity: bytes, req: P.Transfer, hash_bytes: int, event: Any, board: Any = None) -> None:
        hashes = split_hashes(req.hashes, hash_bytes)
        try:
            if req.op == "save":
                handle = self.engine.save(req.instance_id, req.rank, req.block_ids, hashes, after_event=event)
            else:
                handle = self.engine.load(req.instance_id, req.rank, req.block_ids, hashes)
        except Exception as exc:  # the checks above make this a bug: fail the job, keep serving
            from pegaflow.engine import TransferResult

            logger.exception("engine.%s refused job %d after the server accepted it", req.op, req.job_id)
            self._on_done(identity, req.job_id, None, 0, TransferResult(ok=False, num_blocks=0, nbytes=0,
                                                               error=f"{type(exc).__name__}: {exc}"))
        else:
            handle.add_done_callback(partial(self._on_done, identity, req.job_id, board, req.notify))
        # A transfer done already (a small CPU copy) goes out now, not after whatever else the
        # loop does before its next look at the queue.
        if self._done and self.push is not None and threading.get_ident() == self.loop_thread:
            self.push(self.completions())

    def _unregister(self, identity: bytes, session: Session, req: P.Unregister, now: float) -> bytes:
        self._instance(req.instance_id, req.id)
        for registration in [r for r in self.registrations.values() if r.instance_id == req.instance_id]:
            self._close_registration(registration)
        self.engine.unregister(req.instance_id)
        del self.instances[req.instance_id]
        del self.namespaces[req.instance_id]
        logger.info("instance %s unregistered", req.instance_id)
        return P.ok_reply(req.id)

    def _reset(self, identity: bytes, session: Session, req: P.Reset, now: float) -> bytes:
        self._instance(req.instance_id, req.id)
        return P.ok_reply(req.id, dropped=self.engine.reset(req.instance_id))

    def _stats(self, identity: bytes, session: Session | None, req: P.Stats, now: float) -> bytes:
        return P.ok_reply(req.id, stats=self.stats())

    def _health(self, identity: bytes, session: Session | None, req: P.Health, now: float) -> bytes:
        return P.ok_reply(req.id, status="stopping" if self.stopping else "ok",
                          uptime_s=round(now - self.started, 3))

    # ---- helpers ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        c = self.counters
        queried = c.hits + c.misses
        server = {
            "uptime_s": round(time.monotonic() - self.started, 3), "cpu_mode": self.cpu_mode,
            "devices": list(self.devices), "sessions": len(self.sessions),
            "registrations": len(self.registrations), "open_mappings": self.open_mappings,
            "inflight_jobs": len(self.jobs), "queries": c.queries, "hits": c.hits, "misses": c.misses,
            "hit_rate": round(c.hits / queried, 4) if queried else 0.0,
            "saves": c.transfers["save"], "loads": c.transfers["load"],
            "failed_saves": c.failed["save"], "failed_loads": c.failed["load"],
            "bytes_saved": c.nbytes["save"], "bytes_loaded": c.nbytes["load"],
            "sessions_expired": c.sessions_expired, "errors": dict(c.errors),
            "fast_messages": c.fast_messages, "board_notices": c.board_notices,
        }
        instances = [
            {"instance_id": iid, "namespace": self.namespaces[iid], "model": spec.model, "tp_size": spec.tp_size,
             "block_bytes": spec.block_bytes,
             "ranks": sorted(r.rank for r in self.registrations.values() if r.instance_id == iid)}
            for iid, spec in self.instances.items()
        ]
        return {"server": server, "engine": dict(self.engine.stats()), "instances": instances}

    def _instance(self, instance_id: str, request_id: int) -> Any:
        spec = self.instances.get(instance_id)
        if spec is None:
            raise P.ProtocolError(P.UNKNOWN_INSTANCE, f"unknown instance {instance_id!r}", request_id)
        return spec

    def _registration(self, identity: bytes, instance_id: str, rank: int, request_id: int) -> Registration:
        registration = self.registrations.get((instance_id, rank))
        if registration is None or registration.closing:
            raise P.ProtocolError(P.NOT_REGISTERED, f"no KV cache registered for rank {rank} of {instance_id!r}",
                                  request_id)
        if registration.session != identity:
            raise P.ProtocolError(P.NOT_REGISTERED, f"rank {rank} of {instance_id!r} was registered by another "
                                  "client", request_id)
        return registration

    def _event(self, session: Session, registration: Registration, handle: bytes, request_id: int) -> Any:
        if registration.device is None:
            raise P.ProtocolError(P.BAD_FIELD, "event given for a KV cache in CPU memory", request_id)
        event = session.events.get(handle)
        if event is None:
            from pegaflow.sharing import open_event

            try:
                event = open_event(registration.device, handle)
            except Exception as exc:
                raise P.ProtocolError(P.SHARE_FAILED, f"cannot open the CUDA event: {exc}", request_id) from None
            if len(session.events) >= MAX_EVENTS_PER_SESSION:
                session.events.pop(next(iter(session.events)))
            session.events[handle] = event
        return event

    def _on_done(self, session_id: bytes, job_id: int, board: Any, tag: int, result: Any) -> None:
        """Notice a transfer that copied every block on its client's board (from this thread:
        the client sees it without waiting for the loop); then queue the result; from an engine
        thread, wake the loop (on the loop's own thread it pushes the completion after serving
        the current request)."""
        if board is not None and result.ok and not result.skipped and not result.missing:
            board.notice(tag)
            self.counters.board_notices += 1
        self._done.append((session_id, job_id, result, time.monotonic()))
        if threading.get_ident() != self.loop_thread:
            self._wake()

    def _job_finished(self, job: Job, result: Any, finished: float) -> None:
        c, kind = self.counters, job.kind
        c.transfers[kind] += 1
        if not result.ok:
            c.failed[kind] += 1
        c.blocks[kind] += result.num_blocks
        c.nbytes[kind] += result.nbytes
        seconds = max(finished - job.started, 1e-9)
        c.seconds[kind] += seconds
        if result.nbytes:
            c.last_gbps[kind] = result.nbytes / seconds / 1e9
        c.skipped_blocks += len(result.skipped)
        c.missing_blocks += len(result.missing)
        registration = job.registration
        registration.inflight -= 1
        if registration.closing and registration.inflight == 0:
            self._finalize(registration)

    def _end_session(self, identity: bytes, expired: bool = False) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        if expired and session.jobs:
            # A client that was only slow says hello again: tell it which jobs it will never hear of.
            self._lost_jobs[identity] = sorted(session.jobs)
            while len(self._lost_jobs) > MAX_LOST_SESSIONS:
                self._lost_jobs.pop(next(iter(self._lost_jobs)))
        dead = session.process_gone()
        for key in list(session.registrations):
            registration = self.registrations.get(key)
            if registration is not None and registration.session == identity:
                registration.client_dead = dead
                self._close_registration(registration)
        logger.info("session of %s (pid %d) ended", session.name, session.pid)

    def _close_registration(self, registration: Registration) -> None:
        """Stop accepting transfers for it; release it now or when its last copy completes."""
        registration.closing = True
        if self.registrations.get(registration.key) is registration:
            del self.registrations[registration.key]
        session = self.sessions.get(registration.session)
        if session is not None:
            session.registrations.discard(registration.key)
        if registration.inflight == 0:
            self._finalize(registration)

    def _finalize(self, registration: Registration) -> None:
        if registration.storage is None:
            return
        if registration.instance_id in self.instances:
            try:
                self.engine.unregister_kv(registration.instance_id, registration.rank)
            except Exception:
                logger.exception("engine.unregister_kv(%s, %d) failed", registration.instance_id, registration.rank)
        registration.storage = None  # the last reference here: the mapping closes with the engine's
        self.open_mappings -= 1
        from pegaflow import sharing

        if registration.client_dead and isinstance(registration.share, sharing.CpuShare):
            sharing.unlink_cpu(registration.share)
        logger.info("rank %d of %s released", registration.rank, registration.instance_id)


def _completion_frame(job: Job, result: Any) -> bytes:
    return P.encode({
        "op": "completion", "job_id": job.job_id, "kind": job.kind, "ok": bool(result.ok),
        "num_blocks": int(result.num_blocks), "nbytes": int(result.nbytes), "skipped": list(result.skipped),
        "missing": list(result.missing), "error": result.error,
    })


def _short(values: tuple) -> str:
    text = str(list(values))
    return text if len(text) <= 60 else text[:57] + "...]"
