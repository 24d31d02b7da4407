"""The client's deadlines, reconnection and reply matching, against fake and real servers."""

from __future__ import annotations

import os
import signal
import threading

import msgpack
import pytest
import torch
import zmq

from pegaflow.client import DEFAULT_ENDPOINT, PegaClient, PegaServerError, PegaTimeoutError, default_endpoint
from pegaflow.server import protocol as P
from pegaflow.server.spawn import ServerProcess
from test_server_support import hashes, new_instance, register, wait_completion


class FakeServer:
    """A ROUTER in a thread that answers by a script: ``script(request) -> list of replies``."""

    def __init__(self, script) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the real server: a client's new socket takes over
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.script = script
        self.requests: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, frame = self.sock.recv_multipart()
            request = msgpack.unpackb(frame)
            self.requests.append(request)
            for reply in self.script(request):
                self.sock.send_multipart([identity, msgpack.packb(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        self.ctx.term()


def hello_reply(request: dict) -> dict:
    return {"id": request["id"], "ok": True, "version": P.PROTOCOL_VERSION, "heartbeat_s": 1.0, "resumed": False}


def test_default_endpoint_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("PEGAFLOW_ENGINE_ENDPOINT", raising=False)
    assert default_endpoint() == DEFAULT_ENDPOINT == "ipc:///tmp/pega_engine.sock"
    monkeypatch.setenv("PEGAFLOW_ENGINE_ENDPOINT", "tcp://10.0.0.1:5")
    assert PegaClient().endpoint == "tcp://10.0.0.1:5"


def test_no_server_times_out_then_fails_fast_during_backoff():
    client = PegaClient("ipc:///tmp/pf-nobody-listens.sock", timeout_s=0.2, heartbeat=False)
    with pytest.raises(PegaTimeoutError):
        client.health()
    with pytest.raises(PegaTimeoutError, match="retrying in"):  # the backoff window: no second wait
        client.query("x", hashes(1))
    client.close()


def test_a_wedged_server_times_out_and_late_replies_are_dropped():
    held: list[dict] = []

    def script(request):
        if request["op"] == "hello":
            return [hello_reply(request)]
        if request["op"] == "health" and not held:
            held.append(request)  # wedged: no reply to the first health
            return []
        late = [{"id": r["id"], "ok": True, "status": "stale"} for r in held]
        held.clear()
        return late + [{"id": request["id"], "ok": True, "status": "fresh"}]

    fake = FakeServer(script)
    client = PegaClient(fake.endpoint, timeout_s=1.0, heartbeat=False)
    try:
        with pytest.raises(PegaTimeoutError):
            client.health()
        client._down_until = 0.0  # skip the backoff window rather than sleep through it
        assert client.health()["status"] == "fresh"  # the stale reply to the old id was dropped
        assert [r["op"] for r in fake.requests] == ["hello", "health", "hello", "health"]  # re-hello after reconnect
    finally:
        client.close()
        fake.close()


def test_error_replies_raise_server_errors_and_completions_are_collected():
    def script(request):
        if request["op"] == "hello":
            return [hello_reply(request)]
        completion = {"op": "completion", "job_id": 4, "kind": "save", "ok": True, "num_blocks": 2, "nbytes": 64,
                      "skipped": [1], "missing": [], "error": None}
        return [completion, {"id": request["id"], "ok": False, "code": "out_of_range", "message": "block 9"}]

    fake = FakeServer(script)
    client = PegaClient(fake.endpoint, timeout_s=2.0, heartbeat=False)
    try:
        with pytest.raises(PegaServerError) as info:
            client.save("i", 0, 4, [9], hashes(1))
        assert info.value.code == "out_of_range" and "block 9" in info.value.message
        (done,) = client.poll_completions()
        assert done.job_id == 4 and done.ok and done.skipped == (1,)
        assert client.poll_completions() == []
    finally:
        client.close()
        fake.close()


def test_version_mismatch_is_a_clear_error():
    def script(request):
        return [{"id": request["id"], "ok": False, "code": P.VERSION_MISMATCH, "message": "client speaks 1, server 9"}]

    fake = FakeServer(script)
    client = PegaClient(fake.endpoint, timeout_s=2.0, heartbeat=False)
    try:
        with pytest.raises(PegaServerError) as info:
            client.health()
        assert info.value.code == P.VERSION_MISMATCH
    finally:
        client.close()
        fake.close()


def test_client_checks_hashes_before_sending():
    client = PegaClient("ipc:///tmp/pf-unused.sock", timeout_s=0.1, heartbeat=False)
    with pytest.raises(ValueError, match="one length"):
        client.query("i", [os.urandom(32), os.urandom(16)])
    with pytest.raises(ValueError, match="whole number"):
        client.query_blob("i", os.urandom(48), 32)
    with pytest.raises(ValueError, match="whole number"):
        client.query_blob("i", os.urandom(32), 0)
    with pytest.raises(ValueError, match="must be bytes"):
        client.query_blob("i", hashes(2), 32)
    with pytest.raises(ValueError, match="3 hashes for 2"):
        client.load("i", 0, 1, [1, 2], hashes(3))
    client.close()


def test_a_restarted_server_renews_the_session_and_stateless_calls_retry():
    first = ServerProcess(pool_size="8mb")
    client = PegaClient(first.ipc, timeout_s=10.0)
    try:
        cache = new_instance(client)
        register(client, cache)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        second = ServerProcess("--endpoint", first.ipc, pool_size="8mb")
        try:
            assert client.health()["status"] == "ok"  # the socket reconnected by itself
            # The new server has no session for us: the query says hello again and is retried
            # once; it then fails only because the instance died with the old server.
            with pytest.raises(PegaServerError) as info:
                client.query(cache.instance_id, hashes(1))
            assert info.value.code == P.UNKNOWN_INSTANCE
            assert client.stats()["server"]["sessions"] == 1
            cache2 = new_instance(client)
            register(client, cache2)
            client.save(cache2.instance_id, 0, 1, [0, 1], hashes(2))
            assert wait_completion(client, 1).ok
        finally:
            assert second.stop() == 0
    finally:
        client.close()
        first.stop()


def test_no_session_renews_the_session_retries_stateless_calls_and_not_saves():
    state = {"sessions": 0}

    def script(request):
        if request["op"] == "hello":
            state["sessions"] += 1
            return [{**hello_reply(request), "lost_jobs": [7] if state["sessions"] == 2 else []}]
        if state.pop("forget", False):  # the server lost our session (restart, or expiry)
            return [{"id": request["id"], "ok": False, "code": P.NO_SESSION, "message": "send hello first"}]
        return [{"id": request["id"], "ok": True, "hits": 1}]

    fake = FakeServer(script)
    client = PegaClient(fake.endpoint, timeout_s=2.0, heartbeat=False)
    try:
        assert client.query("i", hashes(1)) == 1
        state["forget"] = True
        assert client.query("i", hashes(1)) == 1  # hello again, then the query once more
        assert state["sessions"] == 2
        (lost,) = client.poll_completions()  # the job the expired session had in flight
        assert lost.job_id == 7 and not lost.ok and "expired" in lost.error
        state["forget"] = True
        with pytest.raises(PegaServerError) as info:  # a save needs the registration: not retried
            client.save("i", 0, 1, [0], hashes(1))
        assert info.value.code == P.NO_SESSION
        assert client.query("i", hashes(1)) == 1 and state["sessions"] == 3
    finally:
        client.close()
        fake.close()


def test_completion_from_a_push_is_a_plain_frozen_completion():
    """Completions are built without the dataclass __init__ (speed): still equal, hashable, frozen."""
    import dataclasses

    from pegaflow.client import Completion, _completion

    msg = {"op": "completion", "job_id": 7, "kind": "load", "ok": False, "num_blocks": 3, "nbytes": 12288,
           "skipped": [], "missing": [0, 2], "error": "missing blocks"}
    built = _completion(msg)
    want = Completion(job_id=7, kind="load", ok=False, num_blocks=3, nbytes=12288, skipped=(), missing=(0, 2),
                      error="missing blocks")
    assert built == want and hash(built) == hash(want) and repr(built) == repr(want)
    assert type(built.missing) is tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.ok = True  # type: ignore[misc]
    assert _completion({"op": "completion"}) == Completion(job_id=-1, kind="", ok=False)


def test_health_reply_is_trimmed_and_rcvtimeo_set_once():
    """health drops id/ok; calls with one timeout leave RCVTIMEO alone after the first."""
    fake = FakeServer(lambda req: [hello_reply(req) if req["op"] == "hello" else
                                   {"id": req["id"], "ok": True, "status": "ok"}])
    client = PegaClient(fake.endpoint, timeout_s=2.0, heartbeat=False)
    sock = None
    try:
        for _ in range(2):  # the first call's hello spends some of its deadline
            assert client.health() == {"status": "ok"}
        sock = client._socket
        first = sock.getsockopt(zmq.RCVTIMEO)
        assert 0 < first <= 2001
        calls = []
        real_setsockopt = sock.setsockopt
        client._socket = type("Spy", (), {"__getattr__": lambda self, name: getattr(sock, name),
                                          "setsockopt": lambda self, *a: (calls.append(a), real_setsockopt(*a))})()
        for _ in range(3):
            assert client.health() == {"status": "ok"}
        assert calls == []
    finally:
        if sock is not None:
            client._socket = sock
        client.close()
        fake.close()


def test_transfers_sent_without_waiting_report_refusals_as_failed_completions():
    """wait=False: the message says "ack": false and the call returns once sent; an error reply
    becomes a failed completion with the server's code (no_session also renews the session);
    a completion clears the job; a new session or a replaced socket reports the jobs still open
    as abandoned."""
    state = {"sessions": 0}

    def script(request):
        if request["op"] == "hello":
            state["sessions"] += 1
            return [hello_reply(request)]
        if request["op"] in ("save", "load"):
            assert request["ack"] is False
            job = request["job_id"]
            if job == 1:
                return [{"op": "completion", "job_id": 1, "kind": "load", "ok": True, "num_blocks": 1}]
            if job == 2:
                return [{"id": request["id"], "ok": False, "code": P.OUT_OF_RANGE, "message": "block 9"}]
            if job == 3:
                return [{"id": request["id"], "ok": False, "code": P.NO_SESSION, "message": "send hello first"}]
            return []  # jobs 4 and 5: accepted, their completions never come
        if request["op"] == "health" and state.pop("wedge", False):
            return []
        return [{"id": request["id"], "ok": True, "status": "ok"}]

    fake = FakeServer(script)
    client = PegaClient(fake.endpoint, timeout_s=1.0, heartbeat=False)
    try:
        client.load("i", 0, 4, [2], hashes(1), wait=False)
        client.load("i", 0, 1, [0], hashes(1), wait=False)
        client.save("i", 0, 2, [9], hashes(1), wait=False)
        client.load("i", 0, 3, [1], hashes(1), wait=False)
        got = {}
        while len(got) < 3:
            for done in client.poll_completions(timeout_s=1.0):
                got[done.job_id] = done
        assert got[1].ok and got[1].code is None
        assert not got[2].ok and got[2].kind == "save" and got[2].code == P.OUT_OF_RANGE and "block 9" in got[2].error
        assert not got[3].ok and got[3].code == P.NO_SESSION
        assert client._posted_jobs == {4: client._posted_jobs[4]} and len(client._posted) == 1
        client.load("i", 0, 5, [3], hashes(1), wait=False)  # no_session above: hello again first
        assert state["sessions"] == 2 and list(client._posted_jobs) == [5]
        (lost,) = client.poll_completions()  # job 4 belonged to the old session
        assert lost.job_id == 4 and not lost.ok and lost.code == "abandoned" and "session" in lost.error
        state["wedge"] = True
        with pytest.raises(PegaTimeoutError):  # the socket is replaced: job 5's outcome is unknown
            client.health()
        (abandoned,) = client.poll_completions()
        assert abandoned.job_id == 5 and not abandoned.ok and abandoned.code == "abandoned"
        assert client._posted == {}
    finally:
        client.close()
        fake.close()


def test_the_server_answers_a_transfer_sent_without_waiting_by_its_completion_alone():
    server = ServerProcess(pool_size="8mb")
    client = PegaClient(server.ipc, timeout_s=10.0)
    seen: list[dict] = []  # every message the client reads
    parse = client._parse
    client._parse = lambda frame: (seen.append(msgpack.unpackb(frame, raw=False)), parse(frame))[1]
    try:
        cache = new_instance(client)
        register(client, cache)
        expected = [cache.block(0), cache.block(1)]
        held = hashes(2)
        seen.clear()
        client.save(cache.instance_id, 0, 1, [0, 1], held, wait=False)
        assert wait_completion(client, 1).ok
        cache.refill()  # fresh bytes: the load must bring the saved ones back
        client.load(cache.instance_id, 0, 2, [0, 1], held, wait=False)
        assert wait_completion(client, 2).ok
        assert torch.equal(cache.block(0), expected[0]) and torch.equal(cache.block(1), expected[1])
        client.load(cache.instance_id, 0, 3, [10**6], held[:1], wait=False)  # out of range: refused
        done = wait_completion(client, 3)
        assert not done.ok and done.code == P.OUT_OF_RANGE
        assert [m.get("op", "reply") for m in seen] == ["completion", "completion", "reply"]
        assert seen[-1]["ok"] is False and client._posted == {}
    finally:
        client.close()
        server.stop()
