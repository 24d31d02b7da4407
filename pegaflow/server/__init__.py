"""The PegaFlow server: one process per GPU host that owns the pool; vLLM workers are clients.

Run it with ``python -m pegaflow.server --help``. Importing this package is cheap (no torch):
the scheduler-side connector imports the protocol through :mod:`pegaflow.client`.

Sockets
    A ZMQ ROUTER bound to the IPC endpoint (default ``ipc:///tmp/pega_engine.sock``, file mode
    0600) and to the TCP address (default ``127.0.0.1:50055``); clients are DEALERs whose
    socket identity is their 16-byte session id (``ROUTER_HANDOVER``: a reconnecting client
    keeps its session). One frame per message, a msgpack map of at most
    ``protocol.MAX_MESSAGE_BYTES`` (16 MiB; beyond 4x that ZMQ drops the connection).
    Beside an IPC endpoint at PATH, the fast lane: a Unix datagram socket at ``PATH.fast``
    (mode 0600) where a client may send a save or load as one datagram (its session id, then
    the msgpack map; up to ``protocol.FAST_MAX_BYTES``), served as if it came by ZMQ from that
    session; the reply and the completion come back on ZMQ.

Requests (``{"op": ..., "id": <int>, ...}``; the reply echoes ``id``)
    hello(version, pid?, name?, token?, board?) -> {version, server, cpu_mode, devices, heartbeat_s,
                                               client_timeout_s, max_message_bytes, resumed, lost_jobs,
                                               board: "new" | "kept" | "", fast: path | ""}
    register_instance(instance_id, model, kv_dtype, layout, block_size, page_bytes[],
                      tp_size?, replicated?, hash_bytes?)   -> {namespace}
    register_kv_caches(instance_id, rank, storage{kind, ...}, regions[[offset, block_stride,
                       page_bytes]], num_blocks, device_uuid?)   -> {block_bytes}
    unregister_kv_caches(instance_id, rank) -> {}
    query(instance_id, hashes: bin, hash_bytes)  -> {hits}   longest prefix held on every rank
    save(instance_id, rank, job_id, block_ids[], hashes: bin, hash_bytes, event?: bin, ack?, notify?) -> {job_id}
    load(instance_id, rank, job_id, block_ids[], hashes: bin, hash_bytes, ack?, notify?)              -> {job_id}
    unregister(instance_id)                -> {}
    stats()                                -> {stats}
    health()                               -> {status, uptime_s}
    heartbeat(session)                     (no reply)
    bye()                                  (no reply; ends the session now)
``hashes`` is one ``bin``: the hashes back to back, ``hash_bytes`` each (8..64, fixed per
instance at registration; vLLM's sha256 gives 32), one per block id; ``hash_bytes`` must
equal the instance's, so a hash of the wrong length is refused, never re-sliced.
``event`` is the 64-byte IPC handle of an interprocess CUDA event recorded after the forward
that wrote the blocks: the save's copy waits on it on the GPU (no host-side wait). The
server opens each event handle once per session and keeps it; a worker reuses an event
only after the job that used it has completed. ``storage`` is a sharing handle of
:mod:`pegaflow.sharing` (CUDA IPC, or named shared memory in CPU mode), opened once per
registration; ``regions`` are byte offsets from the start of that storage.

A save or load is accepted (its reply sent) once every check has passed, and its copy is
started right after the reply: the reply never waits for the copy. With ``ack: false`` (the
connector's ``wait_for_acceptance: false``) an accepted transfer gets no reply at all, its
completion being the only answer; a refused one still gets its error reply. The client then
neither waits nor wakes for an acceptance.

Completions: pushed, not polled. When a save or load finishes, the server sends
``{"op": "completion", "job_id", "kind", "ok", "num_blocks", "nbytes", "skipped", "missing",
"error"}`` to the session that started it, after its acceptance reply (``skipped``: indices
of a save's blocks already held or without room, not an error; ``missing``: indices of a
load's blocks not held, ``ok`` false). A client may also offer a completion board in its
hello (the path of a file it made, :mod:`pegaflow.board`); a transfer sent with ``notify: tag``
that copies every block then also gets ``tag`` written on that board by the thread that saw
it end, before the push, so a polling client sees it without waiting for this loop. If the client's socket is away at that moment,
completions wait in the session (bounded) until it talks again. On SIGINT/SIGTERM, copies in
flight get ``--drain-timeout`` seconds; those still running then are reported failed.

Errors: ``{"id", "ok": False, "code", "message"}``, ``code`` one of ``protocol``'s codes
(bad_message, too_large, unknown_op, missing_field, bad_field, version_mismatch, no_session,
unknown_instance, instance_conflict, not_registered, already_registered, out_of_range,
bad_hash, duplicate_job, share_failed, shutting_down, unauthorized, internal). ``id`` is null when the
frame could not be read. Every request is validated before anything acts on it: block ids
against the registered cache, hashes against the instance's length, before any copy.
Everything except hello, health, stats and heartbeat needs a session (a hello first).

Exposure (:mod:`pegaflow.server.exposure`): by default the server listens on the IPC socket
(mode 0600) and loopback TCP only, metrics on 127.0.0.1. Any other address is refused at
start-up unless ``--allow-remote`` AND a shared secret (``--auth-token-file`` or
``$PEGAFLOW_AUTH_TOKEN``) are given. With a secret, ``hello`` must carry it as ``token``
(compared in constant time); until then every request but heartbeat gets ``unauthorized``.

Liveness: clients send a heartbeat every ``heartbeat_s`` (a quarter of ``--client-timeout``)
from a thread of their own. A session silent for ``--client-timeout`` seconds (default 10)
is expired by a sweep that runs every ``heartbeat_s``: its KV cache registrations are closed
(the engine forgets them, the shared mapping is dropped) as soon as its in-flight copies
finish, which the engine bounds by its write timeout. So a killed client's pins and mappings
are gone within ``client_timeout * 1.25`` plus the longest transfer it had in flight. A
client that closes cleanly (``bye``) is released at once. A client that was only slow and
says hello again after its session expired gets ``lost_jobs``: the jobs it had in flight,
whose completions it will never receive (the client reports them as failed completions);
their job ids stay refused (duplicate_job) until those copies have finished. In CPU mode the
named shared-memory segment of a client known dead (by pid) is unlinked when released.
"""
