"""Transfers the server starts piece by piece (pegaflow/server/turns.py): loads and saves take
turns, a released registration cancels what has not started, and everything still completes.

Service-level, with the real engine in CPU mode told that a staging chunk is 2 blocks (so a
10-block transfer is 4 pieces) and a stand-in for the loop's socket (no request waits).
"""

from __future__ import annotations

import os

import msgpack
import pytest
import torch

from pegaflow.engine import Engine, EngineConfig, TransferHandle, TransferResult
from pegaflow.engine.stepped import Transfer
from pegaflow.engine.transfer import CpuLane
from pegaflow.server import protocol as P
from pegaflow.server.service import Service
from pegaflow.server.turns import Turns
from pegaflow.sharing import handle_to_wire, share_storage

ME = b"P" + b"t" * 15
PAGE, BLOCKS = 256, 32


def call(service: Service, now: float, **message) -> dict:
    reply = service.handle_frame(ME, msgpack.packb(message, use_bin_type=True), now)
    service.start_deferred()
    return msgpack.unpackb(reply)


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setattr(CpuLane, "head_blocks", lambda self, direction, slot_bytes: 2)
    engine = Engine(EngineConfig(pool_bytes=1 << 20))
    service = Service(engine, devices=(), client_timeout_s=4.0)
    service.wait_input = lambda timeout_ms: False  # as in the loop: pieces wait for step()
    assert call(service, 0.0, op="hello", id=1, version=P.PROTOCOL_VERSION, pid=os.getpid())["ok"]
    assert call(service, 0.0, op="register_instance", id=2, instance_id="i", model="m", kv_dtype="int8",
                layout="LBNHC", block_size=16, page_bytes=[PAGE])["ok"]
    backing = torch.randint(-128, 128, (BLOCKS * PAGE,), dtype=torch.int8)
    share = share_storage(backing)
    assert call(service, 0.0, op="register_kv_caches", id=3, instance_id="i", rank=0, storage=handle_to_wire(share),
                regions=[[0, PAGE, PAGE]], num_blocks=BLOCKS)["ok"]
    order: list[str] = []
    for name in ("_save_piece", "_load_piece"):
        real = getattr(Engine, name)
        monkeypatch.setattr(Engine, name, lambda self, *a, _real=real, _name=name: (order.append(_name[1:5]),
                                                                                      _real(self, *a))[1])
    yield service, engine, backing, order
    service.close_all()
    engine.close()


def transfer(service: Service, op: str, job_id: int, block_ids: list[int], hashes: list[bytes]) -> dict:
    return call(service, 0.0, op=op, id=100 + job_id, instance_id="i", rank=0, job_id=job_id, block_ids=block_ids,
                hashes=b"".join(hashes), hash_bytes=32)


def finished(service: Service) -> dict[int, dict]:
    return {msgpack.unpackb(frame)["job_id"]: msgpack.unpackb(frame) for _, frame in service.completions()}


def test_a_load_accepted_behind_a_save_starts_before_the_save_has_finished_starting(served):
    service, _, backing, order = served
    pages = backing.view(BLOCKS, PAGE)
    old = [os.urandom(32) for _ in range(10)]
    assert transfer(service, "save", 1, list(range(10, 20)), old)["ok"]
    while service.stepping:
        service.step()
    assert finished(service)[1]["ok"]
    held = pages[10:20].clone()
    order.clear()
    new = [os.urandom(32) for _ in range(10)]
    expected_new = pages[0:10].clone()
    assert transfer(service, "save", 2, list(range(10)), new)["ok"]
    assert transfer(service, "load", 3, list(range(20, 30)), old)["ok"]
    assert order == ["save", "load"] and service.stepping  # each one's first piece, at acceptance
    while service.stepping:
        service.step()
    assert order[:4] == ["save", "load", "load", "save"]  # then turns: each direction in its turn
    assert order.count("save") == order.count("load") == 4
    done = finished(service)
    assert done[2]["ok"] and done[2]["num_blocks"] == 10 and done[3]["ok"] and done[3]["num_blocks"] == 10
    assert torch.equal(pages[20:30], held) and torch.equal(pages[0:10], expected_new)
    pages[0:10] = torch.randint(-128, 128, (10, PAGE), dtype=torch.int8)
    assert transfer(service, "load", 4, list(range(10)), new)["ok"]
    while service.stepping:
        service.step()
    assert finished(service)[4]["ok"] and torch.equal(pages[0:10], expected_new)


def test_a_session_that_expires_midway_cancels_the_rest_and_releases_its_mapping_after(served):
    service, engine, _, _ = served
    keys = [os.urandom(32) for _ in range(10)]
    assert transfer(service, "save", 5, list(range(10)), keys)["ok"]
    assert service.stepping and service.open_mappings == 1
    service.sweep(10.0)  # silent past the client timeout: its registration closes
    assert service.open_mappings == 1  # a piece started: the mapping stays until the job ends
    while service.stepping:
        service.step()
    assert service.completions() == []  # nobody left to tell
    assert service.open_mappings == 0 and not service.jobs
    assert engine.stats()["entries"] == 2  # the first piece's blocks; the rest never booked


def test_shutdown_cancels_the_pieces_not_started():
    class Held:
        direction, closing, rank, instance_id = "save", False, 0, "i"

    started: list[Transfer] = []
    pieces = [TransferHandle() for _ in range(3)]
    t = Transfer("save", 3, lambda: [(0, 1), (1, 1), (2, 1)], lambda first, n: pieces[first], lambda: None)
    turns = Turns()
    turns.start(t, Held(), started.append)
    assert turns and not started
    turns.cancel_all("stopping")
    assert started == [t] and not turns
    pieces[0]._complete(TransferResult(True, 1, 10))
    assert t.handle.wait(1) == TransferResult(False, 1, 10, error="stopping")


def test_turns_alternate_directions_and_keep_each_direction_in_order():
    class Reg:
        closing, rank, instance_id = False, 0, "i"

    log: list[str] = []

    def make(name: str, direction: str, count: int) -> Transfer:
        return Transfer(direction, count, lambda: [(i, 1) for i in range(count)],
                        lambda first, n: (log.append(f"{name}{first}"), TransferHandle.completed(
                            TransferResult(True, 1, 1)))[1], lambda: None)

    turns, done = Turns(), []
    turns.start(make("s", "save", 3), Reg(), done.append)
    turns.start(make("S", "save", 2), Reg(), done.append)
    turns.start(make("l", "load", 2), Reg(), done.append)
    assert log == ["s0", "S0", "l0"]
    while turns:
        turns.step()
    assert log == ["s0", "S0", "l0", "l1", "s1", "s2", "S1"]
    assert [t.handle.wait(0).num_blocks for t in done] == [2, 3, 2]  # l, s, S in the order they finished
