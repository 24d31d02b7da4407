"""Faults, bad input and load against the real server in CPU mode: the small variants of
bench/reliability.py (which runs the full campaign and writes the figures).

Elsewhere already: a client SIGKILLed mid-transfer is released (test_server_lifecycle), the
connector turns a killed server into misses and failed loads under vLLM's scheduler
(test_connector_vllm), 10k fuzz frames (test_server_fuzz)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import reliability as R  # noqa: E402
from pegaflow.client import PegaClient, PegaServerError  # noqa: E402
from pegaflow.engine import Engine, EngineConfig, InstanceSpec  # noqa: E402
from pegaflow.kernels import KVRegions, Region, reference, triton_copy  # noqa: E402
from pegaflow.server import protocol as P  # noqa: E402
from pegaflow.server.spawn import ServerProcess  # noqa: E402
from test_server_support import hashes, new_instance, register  # noqa: E402


# ---- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["save", "load"])
def test_server_killed_during_transfers_fails_calls_within_the_deadline(op):
    result = R.kill_server_during(op, timeout_s=1.0)
    assert result["first_error_s"] >= 0.0


def test_restarted_server_the_same_client_carries_on():
    assert R.restart_server()["reconnected"]


def test_pool_overrun_by_saves_keeps_serving_without_errors():
    result = R.exhaust_pool(saves=24, blocks_per_save=32)
    assert result["evictions"] > 0 and result["pool_overruns"] > 5


def test_sustained_load_small():
    summary = R.sustained_load(procs=3, requests=150, blocks=32, pool_size="1mb")
    assert summary["lost"] == 0 and summary["corrupt"] == 0 and summary["pins_leaked"] == 0
    assert summary["save"] > 0 and summary["load"] > 0 and summary["query"] > 0


def test_fuzz_every_frame_answered_as_promised():
    totals = R.fuzz_campaign(3000, hypothesis_share=0.05)
    assert totals["frames"] == 3000 and totals["replies"] == totals["expected"] > 2500


def test_expected_replies_follow_the_protocol():
    assert R.expected_replies(b"\xc1") == 1  # not msgpack: an error reply
    assert R.expected_replies(P.encode({"op": "heartbeat", "id": 0, "session": b"P" * 16})) == 0
    assert R.expected_replies(P.encode({"op": "bye", "id": 3})) == 0
    assert R.expected_replies(P.encode({"op": "heartbeat", "id": 0, "session": b"short"})) == 1


# ---- no id reaches memory outside the registered regions and the pool ---------------------------


@pytest.fixture(scope="module")
def server():
    with ServerProcess(pool_size="4mb") as proc:
        yield proc


def test_bad_ids_over_the_wire_are_refused_before_any_copy(server):
    """Ids the client would not send (it converts and checks little): straight to the wire."""
    from test_server_support import RawDealer

    from pegaflow.sharing import handle_to_wire, share_storage

    with PegaClient(server.ipc, timeout_s=10.0) as client:
        cache = new_instance(client, num_blocks=8)
        raw = RawDealer(server.ipc)
        try:
            assert raw.hello()["ok"]
            storage = handle_to_wire(share_storage(cache.backing))
            assert raw.call(op="register_kv_caches", id=1, instance_id=cache.instance_id, rank=0, storage=storage,
                            regions=[list(r) for r in cache.regions], num_blocks=cache.num_blocks)["ok"]
            snapshot = cache.backing.clone()
            before = client.stats()
            h32 = hashes(1)[0]
            cases = [  # (block_ids, hashes, code)
                ([-1], h32, P.BAD_FIELD), ([1 << 31], h32, P.BAD_FIELD), ([(1 << 63) - 1], h32, P.BAD_FIELD),
                ([1 << 63], h32, P.BAD_FIELD), ([(1 << 64) - 1], h32, P.BAD_FIELD), ([-(1 << 63)], h32, P.BAD_FIELD),
                ([8], h32, P.OUT_OF_RANGE), ([True], h32, P.BAD_FIELD), ([1.0], h32, P.BAD_FIELD),
                (["1"], h32, P.BAD_FIELD), ([[1]], h32, P.BAD_FIELD), ([None], h32, P.BAD_FIELD),
                ({"0": 1}, h32, P.BAD_FIELD), (b"\x01", h32, P.BAD_FIELD),
                ([0, 1], h32, P.BAD_HASH), ([0], h32 * 2, P.BAD_HASH), ([0], h32[:31], P.BAD_HASH),
                ([0], "x" * 32, P.BAD_FIELD), ([], h32, P.BAD_HASH),
            ]
            for i, (ids, hs, code) in enumerate(cases):
                for op in ("save", "load"):
                    reply = raw.call(op=op, id=1000 + i, instance_id=cache.instance_id, rank=0, job_id=i,
                                     block_ids=ids, hashes=hs, hash_bytes=32)
                    assert not reply["ok"] and reply["code"] == code, (op, ids, reply)
            dup = raw.call(op="load", id=5000, instance_id=cache.instance_id, rank=0, job_id=77, block_ids=[2, 2],
                           hashes=h32 * 2, hash_bytes=32)
            assert dup["code"] == P.BAD_FIELD, dup
            for field, value in (("rank", -1), ("rank", 1 << 63), ("job_id", -1), ("job_id", 1 << 63),
                                 ("hash_bytes", 1 << 63), ("rank", 1)):
                message = dict(op="save", id=6000, instance_id=cache.instance_id, rank=0, job_id=1, block_ids=[0],
                               hashes=h32, hash_bytes=32)
                message[field] = value
                reply = raw.call(**message)
                assert not reply["ok"] and reply["code"] in (P.BAD_FIELD, P.NOT_REGISTERED, P.BAD_HASH), reply
            after = client.stats()
        finally:
            raw.close()
        assert torch.equal(cache.backing, snapshot), "a refused request changed the KV cache"
        for key in ("saves", "loads", "bytes_saved", "bytes_loaded", "entries", "pool_used"):
            assert after["engine"][key] == before["engine"][key], key
        assert after["server"]["inflight_jobs"] == 0


def test_register_kv_regions_beyond_the_storage_are_refused(server):
    with PegaClient(server.ipc, timeout_s=10.0) as client:
        cache = new_instance(client, num_blocks=8)
        size = cache.backing.numel()
        page = cache.page
        bad = [
            [(0, page, page), (size - page, page, page)],  # the second region's last block past the end
            [(0, page, page), (size, page, page)],  # starts at the end
            [(0, page, page), ((1 << 48), page, page)],  # far beyond
            [(0, page, page), (page // 2, page, page)],  # overlaps the first
        ]
        for regions in bad:
            with pytest.raises(PegaServerError) as info:
                client.register_kv_caches(cache.instance_id, 0, cache.backing, regions, cache.num_blocks)
            assert info.value.code == P.BAD_FIELD, (regions, info.value)
        ranks = [i["ranks"] for i in client.stats()["instances"] if i["instance_id"] == cache.instance_id]
        assert ranks == [[]], ranks


def _kv(num_blocks: int = 6, page: int = 64) -> tuple[torch.Tensor, KVRegions]:
    owner = torch.randint(0, 256, (2 * num_blocks * page,), dtype=torch.uint8)
    regions = tuple(Region(owner, r * num_blocks * page, page, page) for r in range(2))
    return owner, KVRegions(regions, num_blocks)


# Gaps left by tests/test_kernels.py's BAD_IDS: ids beyond int64 and of other integer-ish types.
HUGE_AND_ODD = [
    ([0, 1 << 63], "int64|out of range"), ([0, 1 << 64], "int64"), ([0, 1 << 100], "int64"),
    ([0, -(1 << 63)], "negative"), ([0, -(1 << 64)], "int64"), ([True, False], "ints"),
    (np.array([0, 1], dtype=np.float32), "ints|integers"), (np.array([0, 2 ** 63], dtype=np.uint64), "int64"),
    (np.array([True, False]), "ints|integers"), (torch.tensor([True, False]), "integers"),
    (torch.tensor([0, 1], dtype=torch.float16), "integers"), ([0, None], "ints|int64"), ("01", "sequence"),
    (b"\x00\x01", "sequence"), (7, "sequence"), (np.array([[0], [1]]), "1-D"),
]


@pytest.mark.parametrize("impl", [triton_copy, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("ids, message", HUGE_AND_ODD, ids=[repr(c[0])[:30] for c in HUGE_AND_ODD])
def test_kernels_refuse_huge_and_odd_ids_before_any_copy(impl, ids, message):
    owner, kv = _kv()
    buffer = torch.randint(0, 256, (4 * kv.block_bytes,), dtype=torch.uint8)
    kv_before, buffer_before = owner.clone(), buffer.clone()
    for name, call in {
        "gather": lambda: impl.gather(kv, ids, buffer),
        "scatter": lambda: impl.scatter(kv, ids, buffer),
        "gather_into_slots": lambda: impl.gather_into_slots(kv, ids, buffer, [0, 1], kv.block_bytes),
        "scatter_from_slots": lambda: impl.scatter_from_slots(kv, [0, 1], buffer, ids, kv.block_bytes),
    }.items():
        with pytest.raises(ValueError, match=message):
            call()
        assert torch.equal(owner, kv_before) and torch.equal(buffer, buffer_before), name


def test_regions_reaching_past_their_owner_are_refused():
    owner = torch.zeros(1024, dtype=torch.uint8)
    for offset, stride, page, blocks in ((0, 128, 128, 9), (1000, 8, 8, 4), (-8, 8, 8, 1), (0, 8, 16, 2)):
        with pytest.raises(ValueError):
            KVRegions((Region(owner, offset, stride, page),), blocks)


def test_engine_refuses_huge_ids_and_mismatched_lengths_before_anything_changes():
    owner, kv = _kv()
    with Engine(EngineConfig(pool_bytes=1 << 20, devices=())) as engine:
        engine.register_instance(InstanceSpec(instance_id="i", model="m", kv_dtype="int8", layout="LBNHC",
                                              block_size=16, page_bytes=(64, 64), hash_bytes=32))
        engine.register_kv("i", 0, kv)
        hs = hashes(3)
        before = owner.clone()
        bad = {
            "huge": lambda: engine.save("i", 0, [0, 1 << 63], hs[:2]),
            "beyond 64 bits": lambda: engine.load("i", 0, [1 << 70], hs[:1]),
            "negative": lambda: engine.save("i", 0, [-(1 << 63)], hs[:1]),
            "more hashes": lambda: engine.save("i", 0, [0], hs[:2]),
            "fewer hashes": lambda: engine.load("i", 0, [0, 1, 2], hs[:2]),
            "float tensor": lambda: engine.save("i", 0, torch.tensor([0.0]), hs[:1]),
            "bool": lambda: engine.save("i", 0, [True], hs[:1]),
            "bad rank": lambda: engine.save("i", 1 << 63, [0], hs[:1]),
        }
        for name, call in bad.items():
            with pytest.raises(ValueError):
                call()
        stats = engine.stats()
        assert stats["saves"] == stats["loads"] == stats["pool_used"] == stats["entries"] == 0, stats
        assert torch.equal(owner, before)
