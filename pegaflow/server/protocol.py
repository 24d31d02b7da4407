"""The wire protocol: limits, error codes and one frozen dataclass per request.

Every frame is a msgpack map. :func:`decode_request` turns raw bytes into a validated request
dataclass or raises :class:`ProtocolError` (an error code, a message naming the bad value and,
when it could be read, the request id) before anything acts on it. The server answers a
``ProtocolError`` with ``{id, ok: False, code, message}`` and keeps serving.

Hashes travel as ONE msgpack ``bin``: the instance's hashes back to back, each exactly
``hash_bytes`` long (fixed per instance at registration), with ``hash_bytes`` beside them.
The length checks are then O(1), and the server splits the blob in C
(:func:`pegaflow.engine.index.split_hashes`; a query looks the pieces up as it splits them).
For 1,000 hashes on the (loaded, 2-core) dev machine: ~20 us, against ~110 us for a msgpack
array of bins plus a check of each length, ~190 us for Python slicing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 3  # 2: transfers may ask for no reply when accepted ("ack": false); 3: completion board

# A frame larger than this gets a "too_large" reply. 16 MiB holds a save of 131,072 blocks
# (8 bytes per msgpack int) with their 64-byte hashes; a vLLM step saves far fewer.
MAX_MESSAGE_BYTES = 16 << 20
# ZMQ drops the connection of a peer that sends more than this (ZMQ_MAXMSGSIZE): the hard stop
# that keeps a runaway frame out of memory. Between the two, the check above replies.
ZMQ_MAX_MESSAGE_BYTES = 4 * MAX_MESSAGE_BYTES
MAX_BLOCKS_PER_OP = 131_072
MAX_HASHES_PER_OP = 131_072
MAX_REGIONS = 4096  # 80 layers x K/V x a few kv-cache groups, with room to spare
MAX_ID = (1 << 63) - 1  # request ids, job ids: what fits in an int64
MAX_BLOCK_ID = (1 << 31) - 1
MAX_TP_SIZE = 1024
MAX_STRING = 256
MIN_HASH_BYTES, MAX_HASH_BYTES = 8, 64  # xxhash-64 .. sha512; vLLM's sha256 gives 32
MAX_STORAGE_BYTES = 1 << 48
MAX_TOKEN = 1024  # hello's shared secret (pegaflow.server.exposure.MAX_TOKEN_CHARS)

SESSION_BYTES = 16
# The fast lane: beside an ipc:// endpoint at PATH the server binds a Unix datagram socket at
# PATH + FAST_SUFFIX; a client on the same host may send its saves and loads there as one
# datagram each (its session id, then the message), up to FAST_MAX_BYTES. A datagram wakes
# the server's loop directly, where a ZMQ message first wakes an I/O thread on each side.
FAST_SUFFIX = ".fast"
FAST_MAX_BYTES = 192 << 10  # under the default socket buffer limit (net.core.wmem_max, 208 KiB)

# Error codes (the "code" field of an error reply).
BAD_MESSAGE = "bad_message"  # not msgpack, not a map
TOO_LARGE = "too_large"
UNKNOWN_OP = "unknown_op"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"  # wrong type, out of its range, unknown field
VERSION_MISMATCH = "version_mismatch"
NO_SESSION = "no_session"  # no hello from this client (or its session expired)
UNKNOWN_INSTANCE = "unknown_instance"
INSTANCE_CONFLICT = "instance_conflict"
NOT_REGISTERED = "not_registered"  # no KV cache registered for (instance, rank)
ALREADY_REGISTERED = "already_registered"
OUT_OF_RANGE = "out_of_range"  # block ids beyond the registered cache
BAD_HASH = "bad_hash"  # hashes of the wrong length, or not one per block
DUPLICATE_JOB = "duplicate_job"
SHARE_FAILED = "share_failed"  # the memory-sharing handle could not be opened
SHUTTING_DOWN = "shutting_down"
UNAUTHORIZED = "unauthorized"  # the server wants a shared secret in hello: missing or wrong
INTERNAL = "internal"


class ProtocolError(Exception):
    """A request the server refuses: ``code`` is one of the codes above."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


# ---- field checks: each names the field and the bad value ---------------------------------


def _bad(name: str, what: str, value: object) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(BAD_FIELD, f"{name} must be {what}, got {text}")


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(name, f"an int in [{lo}, {hi}]", value)
    return value


def check_str(name: str, value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_STRING:
        raise _bad(name, f"a non-empty string of at most {MAX_STRING} characters", value)
    return value


def check_bytes(name: str, value: object, lo: int, hi: int) -> bytes:
    if type(value) is not bytes or not lo <= len(value) <= hi:
        raise _bad(name, f"bytes of length [{lo}, {hi}]", value)
    return value


def check_bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise _bad(name, "a bool", value)
    return value


def check_ids(name: str, value: object, hi: int, max_len: int) -> list[int]:
    """A list of ints in ``[0, hi]``, at most ``max_len`` long (range per cache checked later)."""
    if type(value) is not list or len(value) > max_len:
        raise _bad(name, f"a list of at most {max_len} ints", value)
    for v in value:
        if type(v) is not int:
            raise _bad(name, "a list of ints", v)
    if value and (min(value) < 0 or max(value) > hi):
        raise _bad(name, f"ids in [0, {hi}]", (min(value), max(value)))
    return value


def _check_hashes(value: object) -> bytes:
    return check_bytes("hashes", value, 0, MAX_HASHES_PER_OP * MAX_HASH_BYTES)


# ---- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    id: int
    version: int
    pid: int = 0
    name: str = "client"
    token: str = field(default="", repr=False)  # the shared secret of a server started with one (see pegaflow.server.exposure)
    board: str = ""  # the path of the client's completion board (pegaflow.board), if it offers one

    def __post_init__(self) -> None:
        check_int("version", self.version, 0, MAX_ID)
        check_int("pid", self.pid, 0, 1 << 31)
        check_str("name", self.name)
        if type(self.board) is not str or len(self.board) > 4096:
            raise _bad("board", "a path of at most 4096 characters", self.board)
        if type(self.token) is not str or len(self.token) > MAX_TOKEN:
            raise _bad("token", f"a string of at most {MAX_TOKEN} characters", "<not shown>")


@dataclass(frozen=True)
class Heartbeat:
    """Keeps a session alive; the only request without a reply."""

    id: int
    session: bytes

    def __post_init__(self) -> None:
        check_bytes("session", self.session, SESSION_BYTES, SESSION_BYTES)


@dataclass(frozen=True)
class RegisterInstance:
    id: int
    instance_id: str
    model: str
    kv_dtype: str
    layout: str
    block_size: int
    page_bytes: tuple[int, ...]
    tp_size: int = 1
    replicated: bool = False
    hash_bytes: int = 32

    def __post_init__(self) -> None:
        for name in ("instance_id", "model", "kv_dtype", "layout"):
            check_str(name, getattr(self, name))
        check_int("block_size", self.block_size, 1, 1 << 20)
        if not 0 < len(self.page_bytes) <= MAX_REGIONS:
            raise _bad("page_bytes", f"1 to {MAX_REGIONS} sizes", self.page_bytes)
        for p in self.page_bytes:
            check_int("page_bytes[]", p, 1, MAX_STORAGE_BYTES)
        check_int("tp_size", self.tp_size, 1, MAX_TP_SIZE)
        check_bool("replicated", self.replicated)
        check_int("hash_bytes", self.hash_bytes, MIN_HASH_BYTES, MAX_HASH_BYTES)


@dataclass(frozen=True)
class RegisterKV:
    """One rank's KV cache: a shared storage and its regions ``(offset, block_stride, page_bytes)``."""

    id: int
    instance_id: str
    rank: int
    storage: dict[str, Any]  # a sharing handle, checked by pegaflow.sharing.handle_from_wire
    regions: tuple[tuple[int, int, int], ...]
    num_blocks: int
    device_uuid: str = ""

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)
        check_int("rank", self.rank, 0, MAX_TP_SIZE - 1)
        if type(self.storage) is not dict:
            raise _bad("storage", "a map (a sharing handle)", self.storage)
        if not 0 < len(self.regions) <= MAX_REGIONS:
            raise _bad("regions", f"1 to {MAX_REGIONS} regions", len(self.regions))
        for region in self.regions:
            if type(region) is not tuple or len(region) != 3:
                raise _bad("regions[]", "[offset, block_stride, page_bytes]", region)
            check_int("regions[].offset", region[0], 0, MAX_STORAGE_BYTES)
            check_int("regions[].block_stride", region[1], 1, MAX_STORAGE_BYTES)
            check_int("regions[].page_bytes", region[2], 1, MAX_STORAGE_BYTES)
        check_int("num_blocks", self.num_blocks, 1, MAX_BLOCK_ID)
        if type(self.device_uuid) is not str or len(self.device_uuid) > MAX_STRING:
            raise _bad("device_uuid", "a string", self.device_uuid)


@dataclass(frozen=True)
class UnregisterKV:
    id: int
    instance_id: str
    rank: int

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)
        check_int("rank", self.rank, 0, MAX_TP_SIZE - 1)


@dataclass(frozen=True)
class Query:
    id: int
    instance_id: str
    hashes: bytes  # back to back, hash_bytes each
    hash_bytes: int  # the length of each, as the client sees them: checked against the instance's

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)
        _check_hashes(self.hashes)
        check_int("hash_bytes", self.hash_bytes, MIN_HASH_BYTES, MAX_HASH_BYTES)


@dataclass(frozen=True)
class Transfer:
    """A save (``op == "save"``) or a load: blocks of one rank's cache and their hashes."""

    id: int
    op: str
    instance_id: str
    rank: int
    job_id: int
    block_ids: list[int]
    hashes: bytes
    hash_bytes: int
    event: bytes | None = None  # save: the CUDA IPC handle of the event after the forward
    # False: no reply when accepted (the completion is the only answer); a refusal is still
    # answered, with an error reply carrying the request's id. Spares the client a wait, and
    # a wake-up, per transfer.
    ack: bool = True
    # > 0: once the transfer has completed with every block copied, write this tag on the
    # session's completion board (pegaflow.board) too; the completion is pushed as well.
    notify: int = 0

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)
        check_int("rank", self.rank, 0, MAX_TP_SIZE - 1)
        check_int("job_id", self.job_id, 0, MAX_ID)
        check_bool("ack", self.ack)
        check_int("notify", self.notify, 0, MAX_ID)
        check_ids("block_ids", self.block_ids, MAX_BLOCK_ID, MAX_BLOCKS_PER_OP)
        _check_hashes(self.hashes)
        check_int("hash_bytes", self.hash_bytes, MIN_HASH_BYTES, MAX_HASH_BYTES)
        if self.event is not None:
            if self.op != "save":
                raise _bad("event", "absent on a load", self.event)
            check_bytes("event", self.event, 1, 256)


@dataclass(frozen=True)
class Unregister:
    id: int
    instance_id: str

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)


@dataclass(frozen=True)
class Reset:
    """Drop every stored block of the instance's namespace (vLLM's prefix-cache reset)."""

    id: int
    instance_id: str

    def __post_init__(self) -> None:
        check_str("instance_id", self.instance_id)


@dataclass(frozen=True)
class Stats:
    id: int


@dataclass(frozen=True)
class Bye:
    """Ends the session now (its registrations are released); no reply."""

    id: int


@dataclass(frozen=True)
class Health:
    id: int


Request = (
    Hello | Heartbeat | Bye | RegisterInstance | RegisterKV | UnregisterKV | Query | Transfer | Unregister | Reset | Stats
    | Health
)

# op -> (class, required fields, optional fields); "id" and "op" are implied.
_OPS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    "hello": (Hello, ("version",), ("pid", "name", "token", "board")),
    "heartbeat": (Heartbeat, ("session",), ()),
    "register_instance": (
        RegisterInstance,
        ("instance_id", "model", "kv_dtype", "layout", "block_size", "page_bytes"),
        ("tp_size", "replicated", "hash_bytes"),
    ),
    "register_kv_caches": (RegisterKV, ("instance_id", "rank", "storage", "regions", "num_blocks"), ("device_uuid",)),
    "unregister_kv_caches": (UnregisterKV, ("instance_id", "rank"), ()),
    "query": (Query, ("instance_id", "hashes", "hash_bytes"), ()),
    "save": (Transfer, ("instance_id", "rank", "job_id", "block_ids", "hashes", "hash_bytes"), ("event", "ack", "notify")),
    "load": (Transfer, ("instance_id", "rank", "job_id", "block_ids", "hashes", "hash_bytes"), ("ack", "notify")),
    "unregister": (Unregister, ("instance_id",), ()),
    "reset": (Reset, ("instance_id",), ()),
    "stats": (Stats, (), ()),
    "health": (Health, (), ()),
    "bye": (Bye, (), ()),
}
OPS = tuple(_OPS)
_OPS_CHECK = {
    op: (cls, required, frozenset(required), frozenset(("id", "op", *required, *optional)))
    for op, (cls, required, optional) in _OPS.items()
}


def _as_tuple(name: str, value: object) -> tuple:
    if type(value) is not list:
        raise _bad(name, "a list", value)
    return tuple(tuple(v) if type(v) is list else v for v in value)


def decode_request(frame: bytes) -> Request:
    """Parse and validate one frame; :class:`ProtocolError` on anything wrong."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(TOO_LARGE, f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(BAD_MESSAGE, f"not a msgpack message ({type(exc).__name__})") from None
    if type(msg) is not dict:
        raise ProtocolError(BAD_MESSAGE, f"a message must be a map, got {type(msg).__name__}")
    request_id = msg.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_ID:
        raise ProtocolError(MISSING_FIELD if request_id is None else BAD_FIELD,
                            f"id must be an int in [0, {MAX_ID}], got {request_id!r}")
    try:
        return _build(msg, request_id)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    except (TypeError, ValueError) as exc:  # e.g. a region that is not a list of three
        raise ProtocolError(BAD_FIELD, str(exc), request_id) from None


def _build(msg: dict, request_id: int) -> Request:
    op = msg.pop("op", None)
    spec = _OPS_CHECK.get(op) if type(op) is str else None
    if spec is None:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r} (known: {', '.join(OPS)})")
    cls, required, required_set, allowed = spec
    keys = msg.keys()
    # Set comparisons in C first; the loops below only name the culprit.
    if not keys >= required_set:
        key = next(k for k in required if k not in msg)
        raise ProtocolError(MISSING_FIELD, f"{op} needs field {key!r}")
    if not keys <= allowed:
        key = next(k for k in keys if k not in allowed)
        raise _bad(f"{op} field {key!r}", f"one of {sorted(allowed)}", "unknown field")
    if cls is Transfer:
        msg["op"] = op
    elif cls is RegisterInstance:
        msg["page_bytes"] = _as_tuple("page_bytes", msg["page_bytes"])
    elif cls is RegisterKV:
        msg["regions"] = _as_tuple("regions", msg["regions"])
    return cls(**msg)


# ---- replies ----------------------------------------------------------------------------------

_packer = msgpack.Packer(use_bin_type=True)


def encode(message: dict) -> bytes:
    """msgpack a reply or a push (``bytes`` stay ``bin``)."""
    return _packer.pack(message)


def ok_reply(request_id: int, **fields: Any) -> bytes:
    fields["id"] = request_id
    fields["ok"] = True
    return _packer.pack(fields)


def error_reply(request_id: int | None, code: str, message: str) -> bytes:
    return _packer.pack({"id": request_id, "ok": False, "code": code, "message": message})
