"""The server process's life: a killed client is released, SIGTERM shuts down cleanly,
metrics and the status command report, a second server cannot steal the socket."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import urllib.request

import pytest
import torch

from pegaflow.client import PegaClient
from pegaflow.server.spawn import ServerProcess, kill_quietly
from test_server_support import hashes, new_instance, register, wait_completion, wait_until

CLIENT_TIMEOUT = 1.0
# The documented bound: expiry after client_timeout, found by a sweep every client_timeout/4,
# then the in-flight copies (tiny here). The margin covers a loaded 2-core machine.
RELEASE_BOUND_S = CLIENT_TIMEOUT * 1.25 + 5.0

WORKER = textwrap.dedent("""
    import os, sys, torch
    from pegaflow.client import PegaClient
    endpoint, instance_id, op = sys.argv[1:4]
    client = PegaClient(endpoint, timeout_s=10.0, name="doomed-worker")
    blocks, page = 256, 16 << 10
    backing = torch.randint(-128, 128, (blocks, page), dtype=torch.int8)
    client.register_kv_caches(instance_id, 0, backing, [(0, page, page)], blocks)
    hashes = [os.urandom(32) for _ in range(blocks)]
    client.save(instance_id, 0, 1, list(range(blocks)), hashes)
    if op == "load":
        client.load(instance_id, 0, 2, list(range(blocks)), hashes)
    print(backing.untyped_storage()._share_filename_cpu_()[1].decode(), flush=True)
    sys.stdin.read()  # wait to be killed
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--metrics-port", str(METRICS_PORT), pool_size="64mb", client_timeout=CLIENT_TIMEOUT)
    yield proc
    assert proc.stop() == 0


@pytest.mark.parametrize("op", ["save", "load"])
def test_a_killed_client_is_released_within_the_bound(server, op):
    with PegaClient(server.ipc, timeout_s=10.0) as observer:
        instance_id = f"doomed-{op}"
        observer.register_instance(instance_id, model="m", kv_dtype="int8", layout="LBNHC", block_size=16,
                                   page_bytes=[16 << 10])
        worker = subprocess.Popen([sys.executable, "-c", WORKER, server.ipc, instance_id, op],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            shm_name = worker.stdout.readline().strip()  # the save (and load) were accepted
            assert shm_name.startswith("/torch_"), shm_name
            held = observer.stats()["server"]
            assert held["registrations"] >= 1 and held["open_mappings"] >= 1 and held["sessions"] >= 2
            worker.send_signal(signal.SIGKILL)  # mid-transfer, or just after it: no goodbye either way
            worker.wait()
        finally:
            kill_quietly(worker)

        def released():
            s = observer.stats()
            srv, eng = s["server"], s["engine"]
            return (srv["registrations"] == 0 and srv["open_mappings"] == 0 and srv["inflight_jobs"] == 0
                    and srv["sessions"] == 1 and eng["loads_pinned"] == 0 and eng["entries_pinned"] == 0)

        wait_until(released, RELEASE_BOUND_S, "the killed client's registration, mapping and pins released")
        assert observer.stats()["server"]["sessions_expired"] >= 1
        assert not os.path.exists("/dev/shm" + shm_name), "the dead client's shared memory was not unlinked"
        assert observer.health()["status"] == "ok"


def test_a_client_that_says_bye_is_released_at_once(server):
    with PegaClient(server.ipc, timeout_s=10.0) as observer:
        worker = PegaClient(server.ipc, timeout_s=10.0)
        cache = new_instance(worker)
        register(worker, cache)
        assert observer.stats()["server"]["registrations"] == 1
        worker.close()
        wait_until(lambda: observer.stats()["server"]["registrations"] == 0, 5.0, "bye releases the registration")


def test_sigterm_finishes_in_flight_work_and_removes_the_socket():
    server = ServerProcess(pool_size="64mb")  # the default client timeout: no expiry races here
    path = server.socket_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = PegaClient(server.ipc, timeout_s=10.0)
    cache = new_instance(client, num_blocks=64, page=64 << 10)
    register(client, cache)
    client.save(cache.instance_id, 0, 1, list(range(64)), hashes(64))
    server.proc.send_signal(signal.SIGTERM)
    done = wait_completion(client, 1)  # finished (or failed) with a message, never silently dropped
    assert done.kind == "save"
    assert server.proc.wait(30) == 0, "\n".join(server.log)
    assert not os.path.exists(path)
    server.stop()
    assert any("server stopped" in line for line in server.log)
    client.close()


def test_a_second_server_cannot_take_a_live_socket(server):
    proc = subprocess.run([sys.executable, "-m", "pegaflow.server", "--endpoint", server.ipc, "--addr", "127.0.0.1:0",
                           "--device", "cpu", "--pool-size", "1mb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "another server is listening" in proc.stderr
    with PegaClient(server.ipc, timeout_s=5.0) as client:
        assert client.health()["status"] == "ok"


def test_a_stale_socket_file_is_replaced():
    first = ServerProcess(pool_size="1mb")
    first.proc.send_signal(signal.SIGKILL)  # leaves its socket file behind
    first.proc.wait()
    assert os.path.exists(first.socket_path)
    second = ServerProcess("--endpoint", first.ipc, pool_size="1mb")  # the later --endpoint wins
    try:
        with PegaClient(first.ipc, timeout_s=5.0) as client:
            assert client.health()["status"] == "ok"
    finally:
        assert second.stop(signal.SIGINT) == 0  # SIGINT shuts down as cleanly as SIGTERM
        first.stop()
    assert not os.path.exists(first.socket_path)


def test_metrics_and_health_routes(server):
    port = METRICS_PORT
    with PegaClient(server.ipc, timeout_s=10.0) as client:
        before = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        cache = new_instance(client)
        register(client, cache)
        hs = hashes(3)
        client.save(cache.instance_id, 0, 1, [0, 1, 2], hs)
        wait_completion(client, 1)
        client.query(cache.instance_id, hs + hashes(1))
        with pytest.raises(Exception):
            client.query("missing", hs)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert metric(text, "pegaflow_query_hits_total") - metric(before, "pegaflow_query_hits_total") == 3
    assert metric(text, "pegaflow_query_misses_total") - metric(before, "pegaflow_query_misses_total") == 1
    assert metric(text, 'pegaflow_errors_total{code="unknown_instance"}') >= 1
    saved = 'pegaflow_transfer_bytes_total{kind="save"}'
    assert metric(text, saved) - metric(before, saved) == 3 * 2 * cache.page
    for needle in ("pegaflow_engine_pool_used", "pegaflow_engine_pool_free", "pegaflow_engine_evictions",
                   "pegaflow_transfer_bandwidth_gbps", "pegaflow_sessions "):
        assert needle in text, needle
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
    assert health.status == 200 and json.loads(health.read())["status"] == "ok"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_status_command(server):
    with PegaClient(server.ipc, timeout_s=10.0) as client:
        cache = new_instance(client)
        register(client, cache)
        hs = hashes(2)
        client.save(cache.instance_id, 0, 1, [0, 1], hs)
        wait_completion(client, 1)
        client.query(cache.instance_id, hs)
        out = subprocess.run([sys.executable, "-m", "pegaflow.cli", "status", "--endpoint", server.ipc],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "pool" in out.stdout and cache.instance_id in out.stdout and "hit rate" in out.stdout
    dead = subprocess.run([sys.executable, "-m", "pegaflow.cli", "status", "--endpoint", "ipc:///tmp/pf-none.sock",
                           "--timeout", "0.3"], capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and "cannot reach" in dead.stderr


@pytest.mark.parametrize("spin_us", ["0", "10000"])
def test_a_server_that_sleeps_or_spins_long_serves_every_request(spin_us):
    """--spin-us 0 (the loop always blocks in its receive) and the longest window both answer
    queries, saves and loads bit for bit: the busy poll only decides how the loop waits."""
    server = ServerProcess("--spin-us", spin_us, pool_size="8mb")
    try:
        with PegaClient(server.ipc, timeout_s=10.0) as client:
            cache = new_instance(client, num_blocks=16, page=1024)
            register(client, cache)
            held = hashes(8)
            saved = cache.backing[:, :8].clone()
            client.save(cache.instance_id, 0, 1, list(range(8)), held)
            assert wait_completion(client, 1).ok
            assert client.query(cache.instance_id, held + hashes(1)) == 8
            cache.refill()
            untouched = cache.backing[:, 8:].clone()
            client.load(cache.instance_id, 0, 2, list(range(8)), held)
            assert wait_completion(client, 2).ok
            assert torch.equal(cache.backing[:, :8].view(torch.uint8), saved.view(torch.uint8))
            assert torch.equal(cache.backing[:, 8:], untouched)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("value", ["-1", "10001", "nan"])
def test_spin_us_out_of_range_is_refused(value):
    from pegaflow.server.__main__ import main

    with pytest.raises(SystemExit, match="--spin-us must be in"):
        main(["--device", "cpu", "--pool-size", "1mb", "--spin-us", value])


def test_loop_config_refuses_a_spin_window_out_of_range():
    from pegaflow.server.loop import MAX_SPIN_S, LoopConfig

    assert LoopConfig(endpoint="ipc:///tmp/x.sock", tcp=None, spin_s=MAX_SPIN_S).spin_s == MAX_SPIN_S
    for bad in (-1e-6, MAX_SPIN_S * 2, float("nan")):
        with pytest.raises(ValueError, match="spin_s"):
            LoopConfig(endpoint="ipc:///tmp/x.sock", tcp=None, spin_s=bad)
