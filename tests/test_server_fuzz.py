"""Hypothesis fuzz: >= 10,000 random and mutated frames at the real server; it keeps serving.

One raw DEALER with a session and a real registration sends batches of frames without
waiting for their replies (no reconnection per message), then asks ``health`` and reads
everything up to its reply. Frames are valid requests with a field dropped, retyped or
replaced, truncated or bit-flipped encodings, and arbitrary bytes and msgpack values.
"""

from __future__ import annotations

import os
import random

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pegaflow.client import PegaClient
from pegaflow.server import protocol as P
from pegaflow.server.spawn import ServerProcess
from pegaflow.sharing import handle_to_wire, share_storage
from test_server_support import RawDealer

BATCH = 250
BATCHES = 40  # 40 * 250 = 10,000 frames from seeded batches
STRUCTURED, STRUCTURED_BATCH = 40, 10  # and 400 drawn one by one by hypothesis
SENT = {"frames": 0}

INSTANCE = "fuzz"
PAGE, BLOCKS = 128, 8


@pytest.fixture(scope="module")
def setup():
    with ServerProcess(pool_size="16mb") as server:
        raw = RawDealer(server.ipc)
        assert raw.hello()["ok"]
        reply = raw.call(op="register_instance", id=1, instance_id=INSTANCE, model="m", kv_dtype="int8",
                         layout="LBNHC", block_size=16, page_bytes=[PAGE], hash_bytes=32)
        assert reply["ok"], reply
        backing = torch.randint(-128, 128, (BLOCKS, PAGE), dtype=torch.int8)
        storage = handle_to_wire(share_storage(backing))
        reply = raw.call(op="register_kv_caches", id=2, instance_id=INSTANCE, rank=0, storage=storage,
                         regions=[[0, PAGE, PAGE]], num_blocks=BLOCKS)
        assert reply["ok"], reply
        yield server, raw, storage, backing
        raw.close()
        assert server.alive(), "\n".join(server.log)
        with PegaClient(server.ipc, timeout_s=10.0) as client:
            assert client.health()["status"] == "ok"
            errors = client.stats()["server"]["errors"]
        assert sum(errors.values()) > SENT["frames"] // 2, errors  # most frames were refused, each with a reply
        assert SENT["frames"] >= 10_000, SENT


def valid_messages(storage: dict) -> list[dict]:
    h = os.urandom(64)
    return [
        {"op": "hello", "id": 5, "version": P.PROTOCOL_VERSION, "pid": os.getpid(), "name": "fuzz"},
        {"op": "health", "id": 6},
        {"op": "stats", "id": 7},
        {"op": "heartbeat", "id": 8, "session": b"P" * 16},
        {"op": "query", "id": 9, "instance_id": INSTANCE, "hashes": h, "hash_bytes": 32},
        {"op": "save", "id": 10, "instance_id": INSTANCE, "rank": 0, "job_id": 1, "block_ids": [0, 1],
         "hashes": h, "hash_bytes": 32},
        {"op": "load", "id": 11, "instance_id": INSTANCE, "rank": 0, "job_id": 2, "block_ids": [2, 3],
         "hashes": h, "hash_bytes": 32},
        {"op": "register_instance", "id": 12, "instance_id": "fuzz2", "model": "m", "kv_dtype": "int8",
         "layout": "LBNHC", "block_size": 16, "page_bytes": [PAGE], "hash_bytes": 32},
        {"op": "register_kv_caches", "id": 13, "instance_id": INSTANCE, "rank": 0, "storage": dict(storage),
         "regions": [[0, PAGE, PAGE]], "num_blocks": BLOCKS},
        {"op": "unregister_kv_caches", "id": 14, "instance_id": "fuzz2", "rank": 0},
        {"op": "unregister", "id": 15, "instance_id": "fuzz2"},
    ]


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=80),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=12)


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def frames(draw, storage: dict) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:  # arbitrary bytes
        return draw(st.binary(max_size=200))
    if kind == 1:  # arbitrary msgpack values
        return _pack(draw(values))
    message = draw(st.sampled_from(valid_messages(storage)))
    message = {k: (dict(v) if isinstance(v, dict) else v) for k, v in message.items()}
    if kind == 2:  # a field retyped or out of range
        key = draw(st.sampled_from(sorted(message)))
        message[key] = draw(values)
    elif kind == 3:  # a field dropped, or one added
        if draw(st.booleans()):
            message.pop(draw(st.sampled_from(sorted(message))))
        else:
            message[draw(st.text(max_size=8))] = draw(values)
    elif kind == 4:  # the encoding truncated or bit-flipped
        raw = bytearray(_pack(message))
        if draw(st.booleans()):
            return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    else:  # a nested field mutated (storage handles, regions, ids)
        key = draw(st.sampled_from(sorted(message)))
        if isinstance(message[key], dict) and message[key]:
            message[key][draw(st.sampled_from(sorted(message[key])))] = draw(values)
        elif isinstance(message[key], list) and message[key]:
            message[key][0] = draw(values)
        elif isinstance(message[key], bytes):
            message[key] = message[key][: draw(st.integers(0, len(message[key])))]
        elif isinstance(message[key], int) and not isinstance(message[key], bool):
            message[key] = draw(st.sampled_from([-1, 0, 1 << 31, 1 << 63, BLOCKS, message[key] + 1]))
    return _pack(message)


def random_value(rng: random.Random, depth: int = 0) -> object:
    """An arbitrary msgpack-able value (the fast generator of the batches)."""
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([-1, 0, 1, 2, 7, 8, 31, 32, 33, 64, 65, 1 << 31, (1 << 63) - 1, 1 << 63, -(1 << 63)])
    if kind == 3:
        return rng.randint(-(1 << 63), (1 << 64) - 1)
    if kind == 4:
        return rng.choice([0.5, float("nan"), float("inf"), -0.0])
    if kind == 5:
        return "".join(rng.choice("aé_z\x00") for _ in range(rng.randrange(12)))
    if kind == 6:
        return rng.randbytes(rng.choice([0, 1, 16, 31, 32, 33, 64, 100]))
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(random_value(rng, 2)): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutated_frame(rng: random.Random, storage: dict) -> bytes:
    """A valid request mutated one way, or random bytes, or a random value."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(200))
    if kind == 1:
        return _pack(random_value(rng))
    message = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rng.choice(valid_messages(storage)).items()}
    key = rng.choice(sorted(message))
    if kind == 2:
        message[key] = random_value(rng)
    elif kind == 3:
        if rng.random() < 0.5:
            del message[key]
        else:
            message[str(random_value(rng, 2))] = random_value(rng)
    elif kind == 4:
        raw = bytearray(_pack(message))
        if rng.random() < 0.5:
            return bytes(raw[: rng.randrange(len(raw))])
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    else:
        value = message[key]
        if isinstance(value, dict) and value:
            value[rng.choice(sorted(value))] = random_value(rng)
        elif isinstance(value, list) and value:
            value[rng.randrange(len(value))] = random_value(rng)
        elif isinstance(value, bytes):
            message[key] = value[: rng.randrange(len(value) + 1)]
        elif isinstance(value, int) and not isinstance(value, bool):
            message[key] = rng.choice([-1, 0, 1 << 31, 1 << 63, BLOCKS, value + 1])
    return _pack(message)


def send_and_check(raw: RawDealer, batch: list[bytes]) -> None:
    for frame in batch:
        raw.send(frame)
    SENT["frames"] += len(batch)
    # The fuzz may have said bye or broken the session: a fresh hello, then health must answer.
    raw.send({"op": "hello", "id": 900_000, "version": P.PROTOCOL_VERSION, "pid": os.getpid(), "name": "fuzz"})
    assert raw.reply_to(900_000)["ok"]
    assert raw.call(op="health", id=900_001)["status"] == "ok"
    raw.other.clear()
    raw.completions.clear()


@settings(max_examples=BATCHES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, (1 << 32) - 1))
def test_batches_of_random_and_mutated_frames(setup, seed):
    """Hypothesis picks the seeds; each seed drives a batch of frames (fast to generate)."""
    server, raw, storage, _ = setup
    rng = random.Random(seed)
    send_and_check(raw, [mutated_frame(rng, storage) for _ in range(BATCH)])


@settings(max_examples=STRUCTURED, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_structured_frames(setup, data):
    """Frames drawn by hypothesis's own strategies, a few per example (slower to generate)."""
    server, raw, storage, _ = setup
    send_and_check(raw, [data.draw(frames(storage)) for _ in range(STRUCTURED_BATCH)])
