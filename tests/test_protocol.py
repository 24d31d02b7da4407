"""The wire protocol's validation, without a server: every frame becomes a request or a ProtocolError."""

from __future__ import annotations

import os

import msgpack
import pytest

from pegaflow.server import protocol as P


def frame(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def error_of(raw: bytes) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(raw)
    return info.value


def test_valid_requests_decode_to_their_dataclasses():
    hashes = os.urandom(64)
    assert P.decode_request(frame(op="hello", id=1, version=P.PROTOCOL_VERSION)) == P.Hello(1, P.PROTOCOL_VERSION)
    q = P.decode_request(frame(op="query", id=2, instance_id="a", hashes=hashes, hash_bytes=32))
    assert q == P.Query(2, "a", hashes, 32)
    s = P.decode_request(frame(op="save", id=3, instance_id="a", rank=0, job_id=9, block_ids=[1, 2], hashes=hashes,
                               hash_bytes=32, event=b"e" * 64))
    assert (s.op, s.block_ids, s.event) == ("save", [1, 2], b"e" * 64)
    r = P.decode_request(frame(op="register_kv_caches", id=4, instance_id="a", rank=1, storage={"kind": "cpu"},
                               regions=[[0, 512, 256], [256, 512, 256]], num_blocks=10))
    assert r.regions == ((0, 512, 256), (256, 512, 256))
    i = P.decode_request(frame(op="register_instance", id=5, instance_id="a", model="m", kv_dtype="bf16",
                               layout="NHD", block_size=16, page_bytes=[128, 128]))
    assert i.page_bytes == (128, 128) and i.hash_bytes == 32
    for op in ("stats", "health", "bye"):
        assert P.decode_request(frame(op=op, id=6)).id == 6


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"\xc1garbage", P.BAD_MESSAGE),  # 0xc1 is never valid msgpack
        (b"", P.BAD_MESSAGE),
        (msgpack.packb([1, 2, 3]), P.BAD_MESSAGE),
        (msgpack.packb({"op": "health", "id": 1}) + b"x", P.BAD_MESSAGE),  # trailing bytes
        (frame(op="health"), P.MISSING_FIELD),
        (frame(op="health", id=-1), P.BAD_FIELD),
        (frame(op="health", id=1 << 63), P.BAD_FIELD),
        (frame(op="health", id="1"), P.BAD_FIELD),
        (frame(op="nope", id=1), P.UNKNOWN_OP),
        (frame(id=1), P.UNKNOWN_OP),
        (frame(op="query", id=1, instance_id="a"), P.MISSING_FIELD),
        (frame(op="query", id=1, instance_id="a", hashes=b""), P.MISSING_FIELD),
        (frame(op="query", id=1, instance_id="a", hashes=b"", hash_bytes=65), P.BAD_FIELD),
        (frame(op="query", id=1, instance_id="a", hashes="text", hash_bytes=32), P.BAD_FIELD),
        (frame(op="query", id=1, instance_id="", hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="query", id=1, instance_id="a", hashes=b"", hash_bytes=32, extra=1), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=1, block_ids=[1, -2], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=1, block_ids=[1.5], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=1, block_ids=[True], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=1, block_ids=[1 << 40], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=-1, block_ids=[], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=P.MAX_TP_SIZE, job_id=1, block_ids=[], hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="load", id=1, instance_id="a", rank=0, job_id=1, block_ids=[], hashes=b"", hash_bytes=32, event=b"e"), P.BAD_FIELD),
        (frame(op="save", id=1, instance_id="a", rank=0, job_id=1, block_ids=list(range(P.MAX_BLOCKS_PER_OP + 1)),
               hashes=b"", hash_bytes=32), P.BAD_FIELD),
        (frame(op="register_kv_caches", id=1, instance_id="a", rank=0, storage=[], regions=[[0, 1, 1]],
               num_blocks=1), P.BAD_FIELD),
        (frame(op="register_kv_caches", id=1, instance_id="a", rank=0, storage={}, regions=[[0, 1]],
               num_blocks=1), P.BAD_FIELD),
        (frame(op="register_kv_caches", id=1, instance_id="a", rank=0, storage={}, regions=[5], num_blocks=1),
         P.BAD_FIELD),
        (frame(op="register_kv_caches", id=1, instance_id="a", rank=0, storage={}, regions=[], num_blocks=1),
         P.BAD_FIELD),
        (frame(op="register_instance", id=1, instance_id="a", model="m", kv_dtype="d", layout="l", block_size=16,
               page_bytes=[128], hash_bytes=7), P.BAD_FIELD),
        (frame(op="register_instance", id=1, instance_id="a", model="m", kv_dtype="d", layout="l", block_size=16,
               page_bytes=[], hash_bytes=32), P.BAD_FIELD),
        (frame(op="hello", id=1, version="1"), P.BAD_FIELD),
        (frame(op="heartbeat", id=1, session=b"short"), P.BAD_FIELD),
        (frame(op=1, id=1), P.UNKNOWN_OP),
    ],
)
def test_bad_frames_get_their_error_code(raw, code):
    err = error_of(raw)
    assert err.code == code, err
    assert err.message


def test_error_names_the_field_and_keeps_the_request_id():
    err = error_of(frame(op="save", id=77, instance_id="a", rank=0, job_id=1, block_ids=["x"], hashes=b"",
                         hash_bytes=32))
    assert err.request_id == 77 and "block_ids" in err.message


def test_oversized_frame_is_refused_before_parsing():
    err = error_of(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    assert err.code == P.TOO_LARGE


def test_replies_are_msgpack_maps_echoing_the_id():
    assert msgpack.unpackb(P.ok_reply(5, hits=3)) == {"id": 5, "ok": True, "hits": 3}
    assert msgpack.unpackb(P.error_reply(None, P.BAD_MESSAGE, "m")) == {
        "id": None, "ok": False, "code": P.BAD_MESSAGE, "message": "m"}
