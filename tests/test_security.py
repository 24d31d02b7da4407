"""Exposure: local-only defaults, refusal to listen beyond loopback without a flag and a
secret, and a shared secret that gates everything when set. No test here sends anything to a
non-loopback address; the refusals happen before any socket is bound."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from pegaflow.client import PegaClient, PegaServerError
from pegaflow.connector.config import ConnectorSettings
from pegaflow.server import exposure
from pegaflow.server import protocol as P
from pegaflow.server.__main__ import DEFAULT_ADDR, build_parser, main
from pegaflow.server.loop import LoopConfig, tcp_endpoint
from pegaflow.server.spawn import ServerProcess
from test_server_support import RawDealer, hashes, new_instance, register, wait_completion

TOKEN = "s3cret-" + os.urandom(12).hex()


# ---- defaults ---------------------------------------------------------------------------------


def test_defaults_are_loopback_tcp_an_owner_only_socket_and_local_metrics():
    args = build_parser().parse_args([])
    assert args.addr == DEFAULT_ADDR and exposure.is_local(tcp_endpoint(args.addr))
    assert exposure.is_local(args.endpoint) and args.endpoint.startswith("ipc://")
    assert args.metrics_host == "127.0.0.1" and not args.allow_remote and args.auth_token_file is None
    # The defaults pass the exposure check with neither flag nor secret.
    LoopConfig(endpoint=args.endpoint, tcp=tcp_endpoint(args.addr))


def test_a_running_server_binds_loopback_and_a_0600_socket(tmp_path):
    with ServerProcess(pool_size="4mb") as server:
        assert server.tcp.startswith("tcp://127.0.0.1:"), server.tcp
        mode = stat.S_IMODE(os.stat(server.socket_path).st_mode)
        assert mode == 0o600, oct(mode)
        assert any("auth off (local only)" in line for line in server.log), list(server.log)[-3:]


@pytest.mark.parametrize("endpoint, local", [
    ("ipc:///tmp/x.sock", True), ("inproc://x", True), ("tcp://127.0.0.1:5", True), ("tcp://127.8.9.10:5", True),
    ("tcp://[::1]:5", True), ("tcp://localhost:5", True), ("tcp://0.0.0.0:5", False), ("tcp://*:5", False),
    ("tcp://10.1.2.3:5", False), ("tcp://[::]:5", False), ("tcp://eth0:5", False), ("tcp://example.com:5", False),
    ("tcp://127.0.0.1;10.0.0.1:5", False), ("pgm://eth0;239.192.1.1:5555", False), ("ws://127.0.0.1:5", False),
])
def test_which_endpoints_are_local(endpoint, local):
    assert exposure.is_local(endpoint) is local


# ---- refusal to start -------------------------------------------------------------------------


def _refusal(argv: list[str], tmp_path, monkeypatch) -> str:
    """main() with these flags must exit before binding anything; returns why it refused."""
    monkeypatch.delenv(exposure.TOKEN_ENV, raising=False)
    endpoint = f"ipc://{tmp_path}/never.sock"
    with pytest.raises(SystemExit) as info:
        main(["--device", "cpu", "--pool-size", "1mb", "--endpoint", endpoint, *argv])
    assert not os.path.exists(endpoint[len("ipc://"):]), "the IPC socket was bound before the refusal"
    return str(info.value)


def _token_file(tmp_path, text: str = TOKEN, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("where", [["--addr", "0.0.0.0:0"], ["--addr", "[::]:0"], ["--addr", "none", "--endpoint",
                                                                                        "tcp://0.0.0.0:0"]])
def test_a_non_loopback_address_without_flag_and_secret_is_refused(where, tmp_path, monkeypatch):
    why = _refusal(where, tmp_path, monkeypatch)
    assert "refusing to listen" in why and "--allow-remote" in why and "secret" in why, why


def test_the_flag_alone_or_the_secret_alone_is_not_enough(tmp_path, monkeypatch):
    why = _refusal(["--addr", "0.0.0.0:0", "--allow-remote"], tmp_path, monkeypatch)
    assert "secret" in why and "needs --allow-remote" not in why, why
    why = _refusal(["--addr", "0.0.0.0:0", "--auth-token-file", _token_file(tmp_path)], tmp_path, monkeypatch)
    assert "--allow-remote" in why and "secret" not in why, why
    monkeypatch.setenv(exposure.TOKEN_ENV, TOKEN)  # the environment's secret counts as a secret, not as the flag
    with pytest.raises(SystemExit, match="needs --allow-remote"):
        main(["--device", "cpu", "--pool-size", "1mb", "--endpoint", f"ipc://{tmp_path}/n.sock", "--addr",
              "10.0.0.1:0"])


def test_metrics_beyond_loopback_need_the_flag(tmp_path, monkeypatch):
    why = _refusal(["--metrics-port", "1", "--metrics-host", "0.0.0.0"], tmp_path, monkeypatch)
    assert "metrics" in why and "--allow-remote" in why, why


@pytest.mark.parametrize("text, mode, reason", [
    (TOKEN, 0o644, "readable by others"), (TOKEN, 0o640, "readable by others"), ("short", 0o600, "16 to 1024"),
    ("has a space in it, sadly", 0o600, "without spaces"), ("x" * 2000, 0o600, "16 to 1024"),
])
def test_bad_token_files_are_refused(text, mode, reason, tmp_path, monkeypatch):
    why = _refusal(["--auth-token-file", _token_file(tmp_path, text, mode)], tmp_path, monkeypatch)
    assert reason in why, why
    assert TOKEN not in why, "the refusal printed the secret"


def test_the_exposure_rules_allow_remote_with_both():
    exposure.check_exposure(["tcp://0.0.0.0:1"], allow_remote=True, token=TOKEN)  # no bind: only the rule
    with pytest.raises(ValueError, match="secret"):
        LoopConfig(endpoint="ipc:///tmp/a.sock", tcp="tcp://0.0.0.0:1", allow_remote=True)
    with pytest.raises(ValueError, match="16 to 1024"):
        LoopConfig(endpoint="ipc:///tmp/a.sock", tcp=None, auth_token="short")
    assert TOKEN not in repr(LoopConfig(endpoint="ipc:///tmp/a.sock", tcp=None, auth_token=TOKEN))


def test_token_comparison():
    key = TOKEN.encode()
    assert exposure.token_matches(key, TOKEN) and exposure.token_matches(key, key)
    for wrong in ("", None, 5, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), [TOKEN]):
        assert not exposure.token_matches(key, wrong)


# ---- a server with a secret -------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    with ServerProcess("--auth-token-file", str(path), pool_size="8mb") as server:
        yield server
        assert server.alive()
        assert not any(TOKEN in line for line in server.log), "the server logged the secret"


@pytest.fixture(params=["ipc", "tcp"])
def secured_endpoint(request, secured):
    return secured.ipc if request.param == "ipc" else secured.tcp


def test_without_the_secret_nothing_works(secured_endpoint, monkeypatch):
    monkeypatch.delenv(exposure.TOKEN_ENV, raising=False)
    for token in (None, "wrong-but-long-enough-token", TOKEN[:-1]):
        with PegaClient(secured_endpoint, timeout_s=10.0, heartbeat=False, auth_token=token) as client:
            for call in (client.hello, client.health, client.stats, lambda: client.query("x", hashes(1))):
                with pytest.raises(PegaServerError) as info:
                    call()
                assert info.value.code == P.UNAUTHORIZED, info.value
    raw = RawDealer(secured_endpoint)
    try:
        assert raw.hello()["code"] == P.UNAUTHORIZED
        storage = {"kind": "cpu", "manager": b"/x", "name": b"/torch_1_2_3", "size": 64}
        requests = [
            dict(op="health", id=1), dict(op="stats", id=2),
            dict(op="query", id=3, instance_id="i", hashes=os.urandom(32), hash_bytes=32),
            dict(op="register_instance", id=4, instance_id="i", model="m", kv_dtype="int8", layout="L",
                 block_size=16, page_bytes=[64]),
            dict(op="register_kv_caches", id=5, instance_id="i", rank=0, storage=storage, regions=[[0, 64, 64]],
                 num_blocks=1),
            dict(op="save", id=6, instance_id="i", rank=0, job_id=1, block_ids=[0], hashes=os.urandom(32),
                 hash_bytes=32),
            dict(op="hello", id=7, version=P.PROTOCOL_VERSION, token=123),
        ]
        for request in requests:
            reply = raw.call(**request)
            assert not reply["ok"] and reply["code"] in (P.UNAUTHORIZED, P.BAD_FIELD), reply
            assert set(reply) == {"id", "ok", "code", "message"}, reply  # nothing about the server leaks
        raw.send({"op": "heartbeat", "id": 0, "session": b"P" * 16})  # no reply, and no session made
    finally:
        raw.close()
    with PegaClient(secured_endpoint, timeout_s=10.0, auth_token=TOKEN) as client:
        server = client.stats()["server"]
        assert server["errors"].get(P.UNAUTHORIZED, 0) >= 10 and server["registrations"] == 0
        assert server["sessions"] == 1, server  # this client's only


def test_with_the_secret_everything_works(secured_endpoint, monkeypatch):
    monkeypatch.setenv(exposure.TOKEN_ENV, TOKEN)  # what the client, the CLI and the connector read
    with PegaClient(secured_endpoint, timeout_s=10.0) as client:
        assert client.health()["status"] == "ok"
        cache = new_instance(client)
        register(client, cache)
        hs = hashes(3)
        original = cache.backing[:, [2, 4, 5]].clone()
        client.save(cache.instance_id, 0, 1, [2, 4, 5], hs)
        assert wait_completion(client, 1).ok
        cache.refill()
        client.load(cache.instance_id, 0, 2, [0, 1, 3], hs)
        assert wait_completion(client, 2).ok
        assert torch.equal(cache.backing[:, [0, 1, 3]], original)


def test_the_connector_takes_the_secret_from_config_or_environment():
    settings = ConnectorSettings.from_extra_config({"auth_token": TOKEN}, env={})
    assert settings.auth_token == TOKEN and TOKEN not in repr(settings)
    settings = ConnectorSettings.from_extra_config({"auth_token": "other"}, env={exposure.TOKEN_ENV: TOKEN})
    assert settings.auth_token == TOKEN
    assert ConnectorSettings.from_extra_config({}, env={}).auth_token is None
    with pytest.raises(ValueError, match="auth_token"):
        ConnectorSettings(auth_token="")
