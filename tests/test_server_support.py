"""Shared pieces of the server tests (no tests here): a raw DEALER and a small CPU KV cache."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import msgpack
import torch
import zmq

from pegaflow.client import PegaClient
from pegaflow.server import protocol as P


class RawDealer:
    """A bare DEALER: sends any bytes, reads replies by id (completions kept aside)."""

    def __init__(self, endpoint: str, identity: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self.completions: list[dict] = []
        self.other: list[dict] = []

    def send(self, message: dict | bytes) -> None:
        self.sock.send(message if isinstance(message, bytes) else msgpack.packb(message, use_bin_type=True))

    def send_parts(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def recv(self, timeout_s: float = 10.0) -> dict:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the server")
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def reply_to(self, request_id: int | None, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg.get("op") == "completion":
                self.completions.append(msg)
            elif msg.get("id") == request_id:
                return msg
            else:
                self.other.append(msg)

    def call(self, timeout_s: float = 10.0, **message) -> dict:
        self.send(message)
        return self.reply_to(message.get("id"), timeout_s)

    def hello(self) -> dict:
        return self.call(op="hello", id=0, version=P.PROTOCOL_VERSION, pid=os.getpid(), name="raw")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@dataclass
class CpuCache:
    """A two-region int8 KV cache in CPU memory, as a worker would hold it."""

    instance_id: str
    backing: torch.Tensor  # [2 regions, num_blocks, page]
    num_blocks: int
    page: int

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        return [(r * self.num_blocks * self.page, self.page, self.page) for r in range(2)]

    def block(self, b: int) -> torch.Tensor:
        return self.backing[:, b].clone()

    def refill(self) -> torch.Tensor:
        self.backing.copy_(torch.randint(-128, 128, self.backing.shape, dtype=torch.int8))
        return self.backing.clone()


def new_instance(client: PegaClient, num_blocks: int = 16, page: int = 256, tp_size: int = 1,
                 hash_bytes: int = 32) -> CpuCache:
    instance_id = f"inst-{uuid.uuid4().hex[:8]}"
    client.register_instance(instance_id, model="tiny", kv_dtype="int8", layout="LBNHC", block_size=16,
                             page_bytes=[page, page], tp_size=tp_size, hash_bytes=hash_bytes)
    backing = torch.randint(-128, 128, (2, num_blocks, page), dtype=torch.int8)
    return CpuCache(instance_id, backing, num_blocks, page)


def register(client: PegaClient, cache: CpuCache, rank: int = 0) -> None:
    client.register_kv_caches(cache.instance_id, rank, cache.backing, cache.regions, cache.num_blocks)


def hashes(n: int, size: int = 32) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def wait_completion(client: PegaClient, job_id: int, timeout_s: float = 10.0):
    """The completion of ``job_id`` (other completions are dropped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for c in client.poll_completions(timeout_s=max(0.0, deadline - time.monotonic())):
            if c.job_id == job_id:
                return c
    raise TimeoutError(f"no completion for job {job_id}")


def wait_until(predicate, timeout_s: float, what: str):
    """Poll ``predicate`` (a server round trip per call) until true; a deadline, not a sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
