"""The client of a PegaFlow server: what vLLM's connector calls.

    client = PegaClient()                      # PEGAFLOW_ENGINE_ENDPOINT or ipc:///tmp/pega_engine.sock
    client.register_instance("inst", model="m", kv_dtype="bfloat16", layout="NHD",
                             block_size=16, page_bytes=[65536] * 32, tp_size=1)
    client.register_kv_caches("inst", 0, kv_backing, regions, num_blocks)
    hits = client.query("inst", hashes)
    client.save("inst", 0, job_id=7, block_ids=[3, 4], hashes=hashes[:2], event=ev)
    for c in client.poll_completions(timeout_s=0.0): ...

Deadlines: every call returns or raises within ``timeout_s``. A dead or wedged server raises
:class:`PegaTimeoutError`; the socket is then replaced (late replies to the old request are
dropped by request id) and, for a backoff that doubles from 0.1 s to 5 s, calls fail at once
with the same error instead of waiting again: a dead server costs the caller nothing.
An error reply raises :class:`PegaServerError` with the server's ``code``.

Sessions: the client's socket identity is its session id. The first call sends ``hello``
(protocol version check, and the shared secret from ``auth_token`` or ``$PEGAFLOW_AUTH_TOKEN``
for a server that requires one: without it every call raises ``PegaServerError("unauthorized")``); a background thread with its own socket sends heartbeats so the
server can release a dead client's registrations (see ``pegaflow.server``). After a reconnect
or a server restart the client says ``hello`` again by itself; calls that need no state on
the server (query, stats, health, register_instance, unregister) are then retried once,
while save, load and register_kv_caches raise ``PegaServerError("no_session")``: the KV cache
registration is gone and the caller must register again.

Completions of saves and loads are pushed by the server on the same socket; any call, and
:meth:`PegaClient.poll_completions`, collects them. A transfer that copies every block is
also marked on a shared-memory completion board (``pegaflow.board``) by the server thread
that saw it end: :meth:`PegaClient.poll_completions` reports it from there, three thread
wake-ups earlier, and drops the pushed copy. ``board=False`` turns the board off.

Fast lane: through an ipc:// endpoint, saves and loads go to the server as Unix datagrams
(``protocol.FAST_SUFFIX``), which wake the server's loop without ZMQ's I/O threads; replies
and completions come back on the ZMQ socket as before. A message larger than
``protocol.FAST_MAX_BYTES``, or one the datagram socket cannot take now, goes by ZMQ (and may
then be served after a datagram sent later). ``fast=False`` sends everything by ZMQ. ``save(..., wait=False)`` and
``load(..., wait=False)`` return once sent, without waiting for the acceptance (the server
sends none): a refusal then arrives as a failed completion carrying the server's ``code``.

Thread-safety: one lock serialises every call on a client, so threads may share one.
A save or load whose acceptance timed out may still run if the server was only slow: keep
its blocks held until its completion arrives or the client gives up on the session.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from pegaflow.board import ClientBoard, slot_of
from pegaflow.server.protocol import FAST_MAX_BYTES, NO_SESSION, PROTOCOL_VERSION, SESSION_BYTES

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "ipc:///tmp/pega_engine.sock"
ENDPOINT_ENV = "PEGAFLOW_ENGINE_ENDPOINT"
AUTH_TOKEN_ENV = "PEGAFLOW_AUTH_TOKEN"  # the shared secret of a server started with one
_BACKOFF_START_S, _BACKOFF_MAX_S = 0.1, 5.0
# Plain ints: enum arithmetic and lookups cost microseconds on every call.
_POLLIN, _NOBLOCK, _EVENTS, _RCVTIMEO = int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.RCVTIMEO)
_monotonic = time.monotonic
# Between looks at the board while a caller waits: yield the CPU (0, the default) or sleep
# this many microseconds (a spinning waiter may slow a server thread on its sibling hyperthread).
BOARD_POLL_US = float(os.environ.get("PEGAFLOW_BOARD_POLL_US", "0") or 0)
if BOARD_POLL_US > 0:
    _sleep_s = BOARD_POLL_US / 1e6
    _yield = lambda: time.sleep(_sleep_s)  # noqa: E731
else:
    _yield = os.sched_yield if hasattr(os, "sched_yield") else (lambda: time.sleep(0))
_unpackb = msgpack.unpackb
_TRANSFER_OPS = frozenset(("save", "load"))
_STATELESS_OPS = frozenset(("query", "stats", "health", "register_instance", "unregister", "reset"))


class PegaClientError(Exception):
    """Anything that went wrong talking to the server."""


class PegaTimeoutError(PegaClientError):
    """No reply within the deadline: the server is dead, wedged or unreachable."""


class PegaServerError(PegaClientError):
    """The server refused the request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Completion:
    """A finished save or load. ``skipped`` (save) and ``missing`` (load) index the call's blocks."""

    job_id: int
    kind: str  # "save" or "load"
    ok: bool
    num_blocks: int = 0
    nbytes: int = 0
    skipped: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    error: str | None = None
    code: str | None = None  # a transfer sent with wait=False: the server's error code, or ABANDONED


# Completion.code of a transfer sent with wait=False whose outcome the client can no longer
# learn (its connection or session was replaced): it may still run on the server.
ABANDONED = "abandoned"


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


def _hash_blob(hashes: Sequence[bytes], count: int | None = None) -> tuple[bytes, int]:
    """``hashes`` and ``hash_bytes`` as the protocol sends them: back to back, all one length."""
    if isinstance(hashes, (bytes, bytearray, str)):
        raise ValueError("hashes must be a sequence of bytes, one per block")
    n = len(hashes)
    if count is not None and n != count:
        raise ValueError(f"{n} hashes for {count} block ids")
    if not n:
        return b"", 32
    blob = b"".join(hashes)  # the one pass over the hashes (it also refuses a non-bytes item)
    size = len(hashes[0])
    # O(1), not a pass over every hash: lengths that differ change the total (all but
    # contrived mixes that average out exactly; the server checks hash_bytes and the total).
    if len(blob) != size * n:
        raise ValueError(f"hashes must all have one length: {n} hashes, the first of {size} bytes, "
                         f"{len(blob)} bytes in all")
    return blob, size


def _id_list(ids: Sequence[int] | Any) -> list[int]:
    if hasattr(ids, "tolist"):  # a tensor or an array
        return ids.tolist()
    return list(ids)


class PegaClient:
    """A session with one PegaFlow server (see the module docstring)."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = 2.0, name: str = "client",
                 heartbeat: bool = True, auth_token: str | None = None, board: bool = True,
                 fast: bool = True) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.endpoint = endpoint or default_endpoint()
        # Sent in every hello; a server without a secret ignores it.
        self._auth_token = auth_token if auth_token is not None else os.environ.get(AUTH_TOKEN_ENV) or None
        self.timeout_s = float(timeout_s)
        self.name = name
        self.session = b"P" + os.urandom(SESSION_BYTES - 1)  # a leading 0 byte is reserved by ZMQ
        self.server_info: dict[str, Any] = {}
        self._heartbeat_enabled = heartbeat
        self._lock = threading.RLock()
        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._next_id = 1
        self._need_hello = True
        self._down_until = 0.0
        self._backoff = _BACKOFF_START_S
        self._completions: list[Completion] = []
        # Transfers sent by _post whose completion has not arrived: request id -> (job id,
        # kind), and job id -> request id.
        self._posted: dict[int, tuple[int, str]] = {}
        self._posted_jobs: dict[int, int] = {}
        self._packer = msgpack.Packer(use_bin_type=True)
        self._rcvtimeo = -1
        self._shared: dict[tuple[str, int], Any] = {}  # storages shared with the server: keep them alive
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._closed = False
        # The completion board: offered in every hello while ``_board_wanted``. ``_noticed``:
        # job id -> (tag, kind, blocks, bytes) of transfers that asked for a notice and have
        # not been reported; ``_tagged``: their slots; ``_early``: job ids reported from the
        # board whose pushed completion is still to come (and be dropped).
        self._board_wanted = board
        self._board: ClientBoard | None = None
        self._board_count = 0
        self._next_tag = 1
        self._noticed: dict[int, tuple[int, str, int, int]] = {}
        self._tagged: set[int] = set()
        self._early: set[int] = set()
        self._block_bytes: dict[tuple[str, int], int] = {}  # from register_kv_caches: a notice's bytes
        # The fast lane: the server's datagram socket path (from hello; "" = none or not usable).
        self._fast_wanted = fast and self.endpoint.startswith("ipc://")
        self._fast_path = ""
        self._fast: socket.socket | None = None

    # ---- operations ---------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """Open (or renew) the session; checks the protocol version. Returns the server's info."""
        with self._lock:
            self._hello(time.monotonic() + self.timeout_s)
            return dict(self.server_info)

    def register_instance(self, instance_id: str, model: str, kv_dtype: str, layout: str, block_size: int,
                          page_bytes: Sequence[int], tp_size: int = 1, replicated: bool = False,
                          hash_bytes: int = 32) -> str:
        """Declare an instance's geometry; returns its namespace. Idempotent for the same spec."""
        reply = self._call({
            "op": "register_instance", "instance_id": instance_id, "model": model, "kv_dtype": kv_dtype,
            "layout": layout, "block_size": block_size, "page_bytes": list(page_bytes), "tp_size": tp_size,
            "replicated": replicated, "hash_bytes": hash_bytes,
        })
        return reply["namespace"]

    def register_kv_caches(self, instance_id: str, rank: int, backing: Any,
                           regions: Sequence[tuple[int, int, int]], num_blocks: int,
                           device: Any = None) -> int:
        """Share ``backing`` (a tensor or UntypedStorage: the KV cache's storage) and register it.

        ``regions`` are ``(offset, block_stride, page_bytes)`` in bytes from the start of the
        backing storage. A CPU storage is moved to shared memory in place (tensors over it keep
        working). ``device`` is only checked against the storage's. Returns the block's bytes.
        """
        from pegaflow.sharing import backing_storage, handle_to_wire, share_storage

        storage = backing_storage(backing)
        if device is not None:
            import torch

            want = torch.device(device)
            if want.type != storage.device.type or (want.index is not None and want.index != storage.device.index):
                raise ValueError(f"device {want} does not hold the backing storage (on {storage.device})")
        handle = share_storage(storage)
        with self._lock:
            self._shared[(instance_id, rank)] = storage
        reply = self._call({
            "op": "register_kv_caches", "instance_id": instance_id, "rank": rank,
            "storage": handle_to_wire(handle), "regions": [list(r) for r in regions], "num_blocks": num_blocks,
            "device_uuid": getattr(handle, "device_uuid", ""),
        })
        with self._lock:
            self._block_bytes[(instance_id, rank)] = int(reply["block_bytes"])
        return reply["block_bytes"]

    def unregister_kv_caches(self, instance_id: str, rank: int) -> None:
        """Drop one rank's registration (the server closes its mapping after in-flight copies)."""
        self._call({"op": "unregister_kv_caches", "instance_id": instance_id, "rank": rank})
        with self._lock:
            self._shared.pop((instance_id, rank), None)

    def query(self, instance_id: str, hashes: Sequence[bytes]) -> int:
        """How many leading ``hashes`` the server holds on every rank."""
        blob, size = _hash_blob(hashes)
        return self._call({"op": "query", "instance_id": instance_id, "hashes": blob, "hash_bytes": size})["hits"]

    def query_blob(self, instance_id: str, blob: bytes, hash_bytes: int) -> int:
        """:meth:`query` of hashes already joined back to back, ``hash_bytes`` each (the wire
        form): for callers that keep them so, it skips the join (~14 us for 1,000 hashes)."""
        if not isinstance(blob, (bytes, bytearray)):
            raise ValueError(f"blob must be bytes, not {type(blob).__name__}")
        if type(hash_bytes) is not int or hash_bytes <= 0 or len(blob) % hash_bytes:
            raise ValueError(f"{len(blob)} bytes are not a whole number of hashes of {hash_bytes!r} bytes")
        return self._call({"op": "query", "instance_id": instance_id, "hashes": blob, "hash_bytes": hash_bytes})["hits"]

    def save(self, instance_id: str, rank: int, job_id: int, block_ids: Sequence[int],
             hashes: Sequence[bytes], event: Any = None, wait: bool = True) -> None:
        """Start saving blocks; returns once accepted. ``event``: an interprocess CUDA event
        (or its IPC handle) recorded after the forward that wrote the blocks. ``wait=False``:
        returns once sent, and a refusal arrives as a failed completion (see :meth:`_post`)."""
        ids = _id_list(block_ids)
        blob, size = _hash_blob(hashes, len(ids))
        msg = {"op": "save", "instance_id": instance_id, "rank": rank, "job_id": job_id, "block_ids": ids,
               "hashes": blob, "hash_bytes": size}
        if event is not None:
            if not isinstance(event, (bytes, bytearray)):
                from pegaflow.sharing import share_event

                event = share_event(event)
            msg["event"] = bytes(event)
        self._call(msg, notice=len(ids)) if wait else self._post(msg, notice=len(ids))

    def load(self, instance_id: str, rank: int, job_id: int, block_ids: Sequence[int],
             hashes: Sequence[bytes], wait: bool = True) -> None:
        """Start loading blocks ``hashes`` into ``block_ids``; returns once accepted
        (``wait=False``: once sent, see :meth:`_post`)."""
        ids = _id_list(block_ids)
        blob, size = _hash_blob(hashes, len(ids))
        msg = {"op": "load", "instance_id": instance_id, "rank": rank, "job_id": job_id, "block_ids": ids,
               "hashes": blob, "hash_bytes": size}
        self._call(msg, notice=len(ids)) if wait else self._post(msg, notice=len(ids))

    def poll_completions(self, timeout_s: float = 0.0) -> list[Completion]:
        """Completions received so far; waits up to ``timeout_s`` for one if there are none."""
        with self._lock:
            if self._noticed:
                self._scan_board()
            if self._socket is not None:
                now = _monotonic()
                self._drain(now + timeout_s if timeout_s > 0 and not self._completions else 0.0, now)
            out, self._completions = self._completions, []
            return out

    def unregister(self, instance_id: str) -> None:
        """Forget an instance on the server (its stored blocks stay; its pins are released)."""
        self._call({"op": "unregister", "instance_id": instance_id})

    def reset(self, instance_id: str) -> int:
        """Drop every block stored under the instance's namespace; returns how many."""
        return int(self._call({"op": "reset", "instance_id": instance_id})["dropped"])

    def stats(self) -> dict[str, Any]:
        return self._call({"op": "stats"})["stats"]

    def health(self) -> dict[str, Any]:
        reply = self._call({"op": "health"})  # a fresh dict: trim it in place
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    def close(self) -> None:
        """End the session (the server releases its registrations now) and close the sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._hb_stop.set()
            if self._socket is not None and not self._need_hello:
                try:
                    self._socket.send(msgpack.packb({"op": "bye", "id": 0}), zmq.NOBLOCK)
                    self._socket.setsockopt(zmq.LINGER, 200)  # let the goodbye out, briefly
                except zmq.ZMQError:
                    pass
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            self._board = None
            if self._fast is not None:
                self._fast.close()
                self._fast = None
                self._fast_path = ""
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=1.0)
        self._ctx.term()

    def __enter__(self) -> PegaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- machinery ----------------------------------------------------------------------------

    def _open(self) -> tuple[float, float]:
        """Under the lock, before a request: the session said hello; (deadline, clock reading)."""
        if self._closed:
            raise PegaClientError("client is closed")
        now = _monotonic()
        deadline = now + self.timeout_s
        if self._need_hello:
            self._hello(deadline)
            now = _monotonic()
        return deadline, now

    def _call(self, msg: dict[str, Any], notice: int | None = None) -> dict[str, Any]:
        """``notice``: a transfer of that many blocks, to be noticed on the board if there is room."""
        with self._lock:
            deadline, now = self._open()
            try:
                if notice is not None:
                    self._claim_notice(msg, notice)
                return self._request(msg, deadline, now)
            except PegaServerError as exc:
                self._drop_notice(msg)
                if exc.code != NO_SESSION:
                    raise
                self._need_hello = True  # the server restarted or expired us
                if msg["op"] not in _STATELESS_OPS:
                    raise
                self._hello(deadline)
                return self._request(msg, deadline)
            except BaseException:
                self._drop_notice(msg)
                raise

    def _hello(self, deadline: float) -> dict[str, Any]:
        hello = {"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid(), "name": self.name[:256] or "client"}
        if self._auth_token:
            hello["token"] = self._auth_token
        offered = self._offer_board()
        if offered is not None:
            hello["board"] = offered.path
        try:
            reply = self._request(hello, deadline)
        finally:
            if offered is not None:
                offered.unlink()  # the server has mapped it by now, or never will
        self._take_board(offered, reply.get("board", ""))
        self._take_fast(reply.get("fast", ""))
        self.server_info = {k: v for k, v in reply.items() if k not in ("id", "ok", "lost_jobs")}
        self._need_hello = False
        for job_id in reply.get("lost_jobs") or ():
            self._unwatch(int(job_id))
            self._posted.pop(self._posted_jobs.pop(int(job_id), -1), None)
            self._completions.append(Completion(
                job_id=int(job_id), kind="", ok=False,
                error="session expired on the server (this client was silent too long): job abandoned"))
        if not reply.get("resumed", False):  # a new session: the old one's transfers will not complete
            self._abandon_posted("the server's session was replaced before this transfer completed")
            logger.info("session opened with %s (server %s)", self.endpoint, reply.get("server"))
        if self._heartbeat_enabled and self._hb_thread is None:
            interval = max(0.05, float(reply.get("heartbeat_s", 1.0)))
            self._hb_thread = threading.Thread(target=self._heartbeats, args=(interval,),
                                               name="pegaflow-heartbeat", daemon=True)
            self._hb_thread.start()
        return reply

    def _offer_board(self) -> ClientBoard | None:
        if not self._board_wanted:
            return None
        try:
            return ClientBoard()
        except OSError as exc:
            logger.warning("no completion board (%s): completions come by push only", exc)
            self._board_wanted = False
            return None

    def _take_board(self, offered: ClientBoard | None, answer: str) -> None:
        """The server mapped the offered board ("new"), kept the session's ("kept"), or has none."""
        if answer == "kept" and self._board is not None:
            return
        # A new session: its transfers are new too (the old one's were abandoned or lost).
        self._board = offered if answer == "new" else None
        self._board_count = 0
        self._noticed.clear()
        self._tagged.clear()
        self._early.clear()

    def _take_fast(self, path: Any) -> None:
        self._fast_path = ""
        if not self._fast_wanted or not path or type(path) is not str:
            return
        if self._fast is None:
            try:
                self._fast = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._fast.setblocking(False)
            except OSError as exc:
                logger.warning("no fast lane (%s): transfers go by ZMQ", exc)
                self._fast_wanted = False
                return
        self._fast_path = path

    def _claim_notice(self, msg: dict[str, Any], blocks: int) -> None:
        """Ask for a notice of this transfer on the board if its slot is free."""
        if self._board is None:
            return
        job_id = int(msg["job_id"])
        if job_id in self._noticed or job_id in self._early:
            return  # a job id still in flight (the server refuses it) or whose push is due
        tag = self._next_tag
        self._next_tag = tag + 1
        slot = slot_of(tag)
        if slot in self._tagged:
            return  # the slot's transfer of SLOTS tags ago is still out: this one comes by push only
        nbytes = blocks * self._block_bytes.get((msg["instance_id"], msg["rank"]), 0)
        msg["notify"] = tag
        self._noticed[job_id] = (tag, str(msg["op"]), blocks, nbytes)
        self._tagged.add(slot)

    def _unwatch(self, job_id: int) -> tuple[int, str, int, int] | None:
        """Stop watching the job's board slot; what was watched, if anything."""
        noticed = self._noticed.pop(job_id, None)
        if noticed is not None:
            self._tagged.discard(slot_of(noticed[0]))
        return noticed

    def _drop_notice(self, msg: dict[str, Any]) -> None:
        tag = msg.get("notify")
        if tag is not None:
            job_id = int(msg["job_id"])
            noticed = self._noticed.get(job_id)
            if noticed is not None and noticed[0] == tag:
                self._unwatch(job_id)

    def _forget_notice(self, job_id: int) -> bool:
        """The job's completion came another way: stop watching its slot. True if it was
        reported from the board already (then this copy is dropped)."""
        self._unwatch(job_id)
        if job_id in self._early:
            self._early.discard(job_id)
            return True
        return False

    def _scan_board(self) -> None:
        """Report the watched transfers the server has marked done since the last look. On a
        weakly ordered CPU the count may be seen before a slot: that notice is then reported at
        the count's next change, or by its push."""
        board = self._board
        if board is None:
            return
        words = board.words
        count = int(words[0])
        if count == self._board_count:
            return
        self._board_count = count
        done = [(job_id, n) for job_id, n in self._noticed.items() if words[slot_of(n[0])] == n[0]]
        for job_id, (_, kind, blocks, nbytes) in done:
            self._unwatch(job_id)
            self._early.add(job_id)
            if self._posted_jobs:
                self._posted.pop(self._posted_jobs.pop(job_id, -1), None)
            self._completions.append(Completion(job_id=job_id, kind=kind, ok=True, num_blocks=blocks, nbytes=nbytes))

    def _post(self, msg: dict[str, Any], notice: int | None = None) -> None:
        """Send a save or load that asks for no reply when accepted (``"ack": False``): the
        caller neither waits for the server nor wakes for its reply. A refusal comes back as
        an error reply, turned here into a failed :class:`Completion` with the server's
        ``code`` (``no_session`` also makes the next call say hello again). If the socket is
        replaced before the job's completion arrives, the job is reported failed, as a call
        that timed out would have raised (its blocks may still be in use: see the module
        docstring)."""
        with self._lock:
            deadline, now = self._open()
            msg["ack"] = False
            job = (int(msg["job_id"]), str(msg["op"]))
            if notice is not None:
                self._claim_notice(msg, notice)
            try:
                request_id = self._send(msg, deadline, now)[1]
            except BaseException:
                self._drop_notice(msg)
                raise
            self._posted[request_id] = job
            self._posted_jobs[job[0]] = request_id

    def _send(self, msg: dict[str, Any], deadline: float, now: float) -> tuple[zmq.Socket, int, float]:
        """Send ``msg`` under a fresh request id: (socket, request id, clock reading)."""
        if now < self._down_until:
            raise PegaTimeoutError(
                f"server {self.endpoint} did not answer recently; retrying in {self._down_until - now:.2f} s"
            )
        sock = self._socket or self._ensure_socket()
        request_id = self._next_id
        self._next_id = request_id + 1
        msg["id"] = request_id
        payload = self._packer.pack(msg)
        if self._fast_path and msg["op"] in _TRANSFER_OPS and len(payload) <= FAST_MAX_BYTES:
            try:
                self._fast.sendmsg((self.session, payload), (), 0, self._fast_path)
                return sock, request_id, now
            except OSError as exc:  # full (EAGAIN, ENOBUFS): this one by ZMQ; gone: ZMQ until the next hello
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    logger.info("fast lane %s unusable (%s): transfers go by ZMQ", self._fast_path, exc)
                    self._fast_path = ""
        # The common path is one send and one blocking receive (RCVTIMEO bounds it): no polls.
        try:
            sock.send(payload, _NOBLOCK)
        except zmq.Again:  # IMMEDIATE: no live connection yet; wait for one, up to the deadline
            if not sock.poll(max(0, int((deadline - _monotonic()) * 1000)), zmq.POLLOUT):
                self._fail(f"could not reach {self.endpoint} within {self.timeout_s} s")
            try:
                sock.send(payload, _NOBLOCK)
            except zmq.Again:
                self._fail(f"could not send to {self.endpoint}")
            now = _monotonic()
        return sock, request_id, now

    def _request(self, msg: dict[str, Any], deadline: float, now: float | None = None) -> dict[str, Any]:
        """Send ``msg`` and return its reply. ``now``: the caller's clock reading, if it has one."""
        sock, request_id, now = self._send(msg, deadline, _monotonic() if now is None else now)
        # From the clock reading taken before the send (microseconds ago, inside the 1 ms rounding
        # up): for one client timeout this is the same value every call, so RCVTIMEO is set once.
        remaining_ms = int((deadline - now) * 1000) + 1
        while True:
            if remaining_ms <= 0:
                self._fail(f"no reply from {self.endpoint} to {msg['op']} within {self.timeout_s} s")
            self._receive_within(sock, remaining_ms)
            try:
                frame = sock.recv()
            except zmq.Again:
                self._fail(f"no reply from {self.endpoint} to {msg['op']} within {self.timeout_s} s")
            reply = self._parse(frame)
            if reply is not None and reply.get("id") == request_id:
                break
            # A completion (kept) or a stale reply to a timed-out request (dropped): wait on.
            remaining_ms = int((deadline - _monotonic()) * 1000) + 1
        self._backoff = _BACKOFF_START_S
        if not reply.get("ok"):
            raise PegaServerError(str(reply.get("code")), str(reply.get("message")))
        return reply

    def _receive_within(self, sock: zmq.Socket, ms: int) -> None:
        """Bound the next receive by ``ms``; the socket option is set only when it changes."""
        if ms != self._rcvtimeo:
            sock.setsockopt(_RCVTIMEO, ms)
            self._rcvtimeo = ms

    def _parse(self, frame: bytes) -> dict[str, Any] | None:
        try:
            reply = _unpackb(frame, raw=False)
        except Exception:
            logger.warning("dropped an unreadable message from %s", self.endpoint)
            return None
        if type(reply) is not dict:
            return None
        if reply.get("op") == "completion":
            done = _completion(reply)
            if (self._noticed or self._early) and self._forget_notice(done.job_id):
                return None  # reported from the board already
            if self._posted_jobs:
                self._posted.pop(self._posted_jobs.pop(done.job_id, -1), None)
            self._completions.append(done)
            return None
        if self._posted and reply.get("id") in self._posted:  # a refused transfer sent by _post
            job_id, kind = self._posted.pop(reply["id"])
            self._posted_jobs.pop(job_id, None)
            self._forget_notice(job_id)
            code = str(reply.get("code"))
            if code == NO_SESSION:
                self._need_hello = True
            self._completions.append(Completion(job_id=job_id, kind=kind, ok=False, code=code,
                                                error=f"{code}: {reply.get('message')}"))
            return None
        return reply

    def _drain(self, deadline: float, now: float | None = None) -> None:
        """Take every message already here; then, while no completion is buffered, block in
        one receive (bounded by ``deadline``) and take whatever arrived with it. A completion
        is picked up the moment it arrives: no poll interval. While transfers wait for a notice
        on the board, the wait polls the board and the socket in turn instead (yielding the
        CPU between looks). ``now``: the caller's clock reading."""
        sock = self._socket
        assert sock is not None
        parse = self._parse
        while True:
            while sock.getsockopt(_EVENTS) & _POLLIN:  # one call, no exception on "nothing"
                parse(sock.recv(_NOBLOCK))
            if self._completions or deadline <= 0.0:
                return
            if self._noticed:
                self._scan_board()
                while not self._completions:
                    if sock.getsockopt(_EVENTS) & _POLLIN:
                        break
                    if _monotonic() >= deadline:
                        return
                    _yield()
                    self._scan_board()
                now = None
                continue
            if now is None:
                now = _monotonic()
            remaining = deadline - now
            now = None
            if remaining <= 0:
                return
            ms = int(remaining * 1000) + 1
            self._receive_within(sock, ms)
            try:
                frame = sock.recv()
            except zmq.Again:
                return
            parse(frame)

    def _ensure_socket(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.session)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sock.connect(self.endpoint)
            self._socket = sock
            self._rcvtimeo = -1
        return self._socket

    def _fail(self, message: str) -> None:
        """Give up on the request: replace the socket, back off, raise."""
        if self._socket is not None:
            try:
                self._drain(0.0)  # keep completions already here
            finally:
                self._socket.close()
                self._socket = None
                self._abandon_posted("the connection to the server was replaced before this transfer completed")
                # Pushes on the old socket may be lost: a job reported from the board whose push
                # never comes must not make a later job of the same id drop its own completion
                # (a duplicate of an ended job is the lesser harm: the connector ignores it).
                self._early.clear()
        self._need_hello = True
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
        raise PegaTimeoutError(message)

    def _abandon_posted(self, why: str) -> None:
        """Report every posted transfer still waiting for its completion failed (code ``abandoned``)."""
        for job_id, kind in self._posted.values():
            self._forget_notice(job_id)  # reported failed here: a late notice must not report it again
            self._completions.append(Completion(job_id=job_id, kind=kind, ok=False, error=why, code=ABANDONED))
        self._posted.clear()
        self._posted_jobs.clear()

    def _heartbeats(self, interval: float) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a server that is away gets no backlog of beats
        sock.connect(self.endpoint)
        beat = msgpack.packb({"op": "heartbeat", "id": 0, "session": self.session}, use_bin_type=True)
        try:
            while not self._hb_stop.wait(interval):
                try:
                    sock.send(beat, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        finally:
            sock.close()


_new = object.__new__


def _completion(msg: dict[str, Any]) -> Completion:
    # Filled in one dict update: a frozen dataclass's __init__ sets each field through
    # object.__setattr__, twice the cost on the path of every completion. Same object.
    done = _new(Completion)
    done.__dict__.update(
        job_id=int(msg.get("job_id", -1)), kind=str(msg.get("kind", "")), ok=bool(msg.get("ok")),
        num_blocks=int(msg.get("num_blocks", 0)), nbytes=int(msg.get("nbytes", 0)),
        skipped=tuple(msg.get("skipped") or ()), missing=tuple(msg.get("missing") or ()),
        error=msg.get("error"),
    )
    return done
