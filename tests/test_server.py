"""The real server process in CPU mode, over IPC and TCP: every operation and every error path."""

from __future__ import annotations

import os

import msgpack
import pytest
import torch

from pegaflow.client import PegaClient, PegaServerError
from pegaflow.server import protocol as P
from pegaflow.server.spawn import ServerProcess
from test_server_support import RawDealer, hashes, new_instance, register, wait_completion


@pytest.fixture(scope="module")
def server():
    with ServerProcess(pool_size="32mb") as proc:
        yield proc
        assert proc.alive(), "\n".join(proc.log)


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, server):
    return server.ipc if request.param == "ipc" else server.tcp


@pytest.fixture
def client(endpoint):
    c = PegaClient(endpoint, timeout_s=10.0, name="test")
    yield c
    c.close()


@pytest.fixture
def raw(endpoint):
    r = RawDealer(endpoint)
    assert r.hello()["ok"]
    yield r
    r.close()


def test_hello_health_stats(client):
    info = client.hello()
    assert info["version"] == P.PROTOCOL_VERSION and info["cpu_mode"] is True and info["heartbeat_s"] > 0
    assert client.health()["status"] == "ok"
    stats = client.stats()
    assert stats["server"]["cpu_mode"] and stats["engine"]["pool_bytes"] == 32 << 20


def test_save_load_round_trip_is_bit_exact_and_leaves_other_blocks_alone(client):
    cache = new_instance(client, num_blocks=16)
    register(client, cache)
    hs = hashes(4)
    src = [1, 6, 7, 15]
    originals = [cache.block(b) for b in src]
    assert client.query(cache.instance_id, hs) == 0
    client.save(cache.instance_id, 0, 1, src, hs)
    done = wait_completion(client, 1)
    assert done.ok and done.kind == "save" and done.num_blocks == 4 and done.nbytes == 4 * 2 * cache.page
    assert client.query(cache.instance_id, hs) == 4
    assert client.query(cache.instance_id, hs[:2] + hashes(1) + hs[2:]) == 2  # a prefix, not a count
    assert client.query_blob(cache.instance_id, b"".join(hs[:3] + hashes(1) + hs[3:]), 32) == 3

    fresh = cache.refill()  # the worker reuses its blocks: new random data everywhere
    dst = [0, 3, 9, 2]
    client.load(cache.instance_id, 0, 2, dst, hs)
    done = wait_completion(client, 2)
    assert done.ok and done.kind == "load" and done.num_blocks == 4
    for b, original in zip(dst, originals):
        assert torch.equal(cache.block(b), original), f"block {b} differs"
    untouched = [b for b in range(cache.num_blocks) if b not in dst]
    assert torch.equal(cache.backing[:, untouched], fresh[:, untouched])


def test_save_of_held_blocks_is_skipped_and_load_of_unknown_reports_missing(client):
    cache = new_instance(client)
    register(client, cache)
    hs = hashes(2)
    client.save(cache.instance_id, 0, 10, [0, 1], hs)
    assert wait_completion(client, 10).ok
    client.save(cache.instance_id, 0, 11, [2, 3], hs)
    again = wait_completion(client, 11)
    assert again.ok and again.skipped == (0, 1)
    client.load(cache.instance_id, 0, 12, [4, 5], [hs[0], os.urandom(32)])
    partial = wait_completion(client, 12)
    assert not partial.ok and partial.missing == (1,) and partial.error


def test_reset_drops_the_instance_namespace_so_nothing_stale_is_served(client):
    cache = new_instance(client)
    register(client, cache)
    hs = hashes(3)
    client.save(cache.instance_id, 0, 20, [0, 1, 2], hs)
    assert wait_completion(client, 20).ok and client.query(cache.instance_id, hs) == 3
    assert client.reset(cache.instance_id) >= 3  # the namespace may hold other tests' blocks too
    assert client.query(cache.instance_id, hs) == 0
    client.load(cache.instance_id, 0, 21, [4], hs[:1])
    assert wait_completion(client, 21).missing == (0,)
    with pytest.raises(PegaServerError) as info:
        client.reset("no-such-instance")
    assert info.value.code == P.UNKNOWN_INSTANCE


def test_register_instance_is_idempotent_and_conflicts_are_refused(client):
    cache = new_instance(client)
    spec = dict(model="tiny", kv_dtype="int8", layout="LBNHC", block_size=16, page_bytes=[cache.page] * 2)
    assert client.register_instance(cache.instance_id, **spec) == client.register_instance(cache.instance_id, **spec)
    with pytest.raises(PegaServerError) as info:
        client.register_instance(cache.instance_id, **{**spec, "block_size": 32})
    assert info.value.code == P.INSTANCE_CONFLICT


def test_unregister_kv_and_instance(client):
    cache = new_instance(client)
    register(client, cache)
    before = client.stats()["server"]["open_mappings"]
    client.unregister_kv_caches(cache.instance_id, 0)
    assert client.stats()["server"]["open_mappings"] == before - 1
    with pytest.raises(PegaServerError) as info:
        client.save(cache.instance_id, 0, 1, [0], hashes(1))
    assert info.value.code == P.NOT_REGISTERED
    register(client, cache)
    client.unregister(cache.instance_id)
    with pytest.raises(PegaServerError) as info:
        client.query(cache.instance_id, hashes(1))
    assert info.value.code == P.UNKNOWN_INSTANCE
    assert cache.instance_id not in [i["instance_id"] for i in client.stats()["instances"]]


def test_transfer_errors_are_checked_before_any_copy(client, raw):
    cache = new_instance(client, num_blocks=8)
    register(client, cache)
    snapshot = cache.backing.clone()
    iid = cache.instance_id
    cases = [
        (lambda: client.save(iid, 0, 1, [8], hashes(1)), P.OUT_OF_RANGE),
        (lambda: client.load(iid, 0, 1, [0, 1 << 30], hashes(2)), P.OUT_OF_RANGE),
        (lambda: client.save(iid, 0, 1, [1, 2], hashes(2, size=16)), P.BAD_HASH),
        (lambda: client.query(iid, hashes(2, size=16)), P.BAD_HASH),
        (lambda: client.query_blob(iid, b"".join(hashes(2, size=16)), 16), P.BAD_HASH),
        (lambda: client.load(iid, 0, 1, [3, 3], hashes(2)), P.BAD_FIELD),
        (lambda: client.save("nope", 0, 1, [1], hashes(1)), P.UNKNOWN_INSTANCE),
        (lambda: client.query("nope", hashes(1)), P.UNKNOWN_INSTANCE),
        (lambda: client.save(iid, 1, 1, [1], hashes(1)), P.NOT_REGISTERED),
        (lambda: client.save(iid, 0, 1, [1], hashes(1), event=b"\x01" * 64), P.BAD_FIELD),  # event on a CPU cache
    ]
    for call, code in cases:
        with pytest.raises(PegaServerError) as info:
            call()
        assert info.value.code == code, info.value
    raw_cases = [  # what the client's own checks would stop: hashes not one per block
        dict(block_ids=[1, 2], hashes=os.urandom(96), hash_bytes=32),
        dict(block_ids=[1, 2], hashes=os.urandom(32), hash_bytes=16),
    ]
    for i, fields in enumerate(raw_cases):
        reply = raw.call(op="save", id=50 + i, instance_id=iid, rank=0, job_id=1, **fields)
        assert reply["code"] in (P.BAD_HASH, P.NOT_REGISTERED), reply  # raw has its own session
    with pytest.raises(ValueError):
        client.save(iid, 0, 1, [1, 2], hashes(3))
    assert torch.equal(cache.backing, snapshot)
    assert client.stats()["server"]["inflight_jobs"] == 0


def test_duplicate_job_id_in_flight_is_refused(client):
    cache = new_instance(client, num_blocks=64, page=64 << 10)
    register(client, cache)
    client.save(cache.instance_id, 0, 5, list(range(64)), hashes(64))
    try:
        client.save(cache.instance_id, 0, 5, [0], hashes(1))
    except PegaServerError as exc:  # the first save may already be done: then the id is free again
        assert exc.code == P.DUPLICATE_JOB
    wait_completion(client, 5)


def test_register_kv_errors(client, raw):
    cache = new_instance(client)
    iid = cache.instance_id
    with pytest.raises(PegaServerError) as info:  # pages differ from the instance's
        client.register_kv_caches(iid, 0, cache.backing, [(0, 128, 128), (4096, 128, 128)], 8)
    assert info.value.code == P.BAD_FIELD
    with pytest.raises(PegaServerError) as info:  # regions reach past the storage
        client.register_kv_caches(iid, 0, cache.backing, [(0, 256, 256), (8192, 256, 256)], 64)
    assert info.value.code == P.BAD_FIELD
    with pytest.raises(PegaServerError) as info:
        client.register_kv_caches(iid, 3, cache.backing, cache.regions, cache.num_blocks)
    assert info.value.code == P.BAD_FIELD
    regions = [list(r) for r in cache.regions]
    bad_storages = [
        {"kind": "cpu", "manager": b"/nope/manager.sock", "name": b"/torch_1_2_3", "size": 8192},
        {"kind": "cpu", "manager": b"/x", "name": b"/etc/passwd", "size": 1},
        {"kind": "cuda", "device": 0, "handle": b"h", "size": 1, "offset": 0, "ref_counter_handle": b"r",
         "ref_counter_offset": 0, "event_handle": None, "event_sync_required": False},
        {"kind": "tape"},
        {"kind": "cpu", "name": b"/torch_1_2_3"},
    ]
    for i, storage in enumerate(bad_storages):
        reply = raw.call(op="register_kv_caches", id=100 + i, instance_id=iid, rank=0, storage=storage,
                         regions=regions, num_blocks=4)
        assert not reply["ok"] and reply["code"] in (P.SHARE_FAILED, P.BAD_FIELD), reply
    # a real segment, claimed larger than it is: refused, never mapped past its end
    from pegaflow.sharing import handle_to_wire, share_storage

    small = torch.zeros(1024, dtype=torch.int8)
    wire = handle_to_wire(share_storage(small))
    wire["size"] = 1 << 20
    reply = raw.call(op="register_kv_caches", id=200, instance_id=iid, rank=0, storage=wire, regions=regions,
                     num_blocks=4)
    assert reply["code"] == P.SHARE_FAILED


def test_a_rank_registered_by_one_client_is_refused_to_another(client, endpoint):
    cache = new_instance(client)
    register(client, cache)
    with PegaClient(endpoint, timeout_s=10.0) as other:
        with pytest.raises(PegaServerError) as info:
            register(other, cache)
        assert info.value.code == P.ALREADY_REGISTERED
        with pytest.raises(PegaServerError) as info:
            other.save(cache.instance_id, 0, 1, [0], hashes(1))
        assert info.value.code == P.NOT_REGISTERED


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\xc1\xc1 not msgpack", P.BAD_MESSAGE),
        (msgpack.packb("a string"), P.BAD_MESSAGE),
        (msgpack.packb({"op": "fly", "id": 3}), P.UNKNOWN_OP),
        (msgpack.packb({"op": "query", "id": 3}), P.MISSING_FIELD),
        (msgpack.packb({"op": "query", "id": 3, "instance_id": 5, "hashes": b"", "hash_bytes": 32}), P.BAD_FIELD),
        (msgpack.packb({"op": "hello", "id": 3, "version": P.PROTOCOL_VERSION + 1}), P.VERSION_MISMATCH),
        (b"\x00" * (P.MAX_MESSAGE_BYTES + 10), P.TOO_LARGE),
    ],
)
def test_bad_messages_get_an_error_reply_and_the_server_keeps_serving(raw, payload, code):
    raw.send(payload)
    reply = raw.reply_to(3 if code not in (P.BAD_MESSAGE, P.TOO_LARGE) else None)
    assert reply["ok"] is False and reply["code"] == code and reply["message"]
    if code == P.VERSION_MISMATCH:
        assert str(P.PROTOCOL_VERSION) in reply["message"]
    assert raw.call(op="health", id=4)["status"] == "ok"


def test_multi_frame_message_is_refused(raw):
    raw.send_parts([msgpack.packb({"op": "health", "id": 1}), b"extra"])
    assert raw.reply_to(None)["code"] == P.BAD_MESSAGE
    assert raw.call(op="health", id=2)["ok"]


def test_requests_need_a_session(endpoint):
    r = RawDealer(endpoint)
    try:
        reply = r.call(op="query", id=1, instance_id="x", hashes=b"", hash_bytes=32)
        assert reply["code"] == P.NO_SESSION
        assert r.call(op="health", id=2)["ok"]  # health and stats need none
    finally:
        r.close()


def test_replies_echo_request_ids_in_order(raw):
    for i in range(20):
        raw.send({"op": "health", "id": 1000 + i})
    assert [raw.reply_to(1000 + i)["id"] for i in range(20)] == list(range(1000, 1020))


def test_registering_again_replaces_and_a_failed_attempt_keeps_the_old(client):
    cache = new_instance(client, num_blocks=8)
    register(client, cache)
    with pytest.raises(PegaServerError):  # more blocks than the storage holds
        client.register_kv_caches(cache.instance_id, 0, cache.backing, cache.regions, 64)
    hs = hashes(1)
    client.save(cache.instance_id, 0, 1, [2], hs)  # the old registration still serves
    assert wait_completion(client, 1).ok
    before = client.stats()["server"]["open_mappings"]
    register(client, cache)  # a working re-registration replaces it (one mapping, not two)
    assert client.stats()["server"]["open_mappings"] == before
    client.load(cache.instance_id, 0, 2, [5], hs)
    assert wait_completion(client, 2).ok and torch.equal(cache.block(5), cache.block(2))
