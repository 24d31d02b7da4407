"""The completion board: its checks, and the real server and client reporting every transfer
exactly once through it (the pushed copy dropped), with and without the board."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch

from pegaflow.board import BOARD_BYTES, SLOTS, ClientBoard, ServerBoard, slot_of
from pegaflow.client import PegaClient, PegaServerError
from pegaflow.server.spawn import ServerProcess
from test_server_support import hashes, new_instance, register, wait_completion


def test_a_notice_written_by_the_server_side_is_read_by_the_client_side():
    client = ClientBoard()
    try:
        server = ServerBoard(client.path)
        tag = SLOTS + 5  # wraps round onto slot 6
        server.notice(tag)
        assert client.words[slot_of(tag)] == tag and slot_of(tag) == 6
        assert client.words[0] == 1 and int(client.words[1:].sum()) == tag  # no other slot touched
    finally:
        client.unlink()
    assert not os.path.exists(client.path)
    server.notice(7)  # the page outlives its name
    assert client.words[slot_of(7)] == 7 and client.words[0] == 2


def test_the_server_maps_only_a_board_file_of_the_right_name_size_and_kind(tmp_path):
    good = ClientBoard()
    try:
        folder = os.path.dirname(good.path)
        with pytest.raises(ValueError, match="pegaflow-board"):
            ServerBoard(str(tmp_path / os.path.basename(good.path)))  # another folder
        with pytest.raises(ValueError, match="pegaflow-board"):
            ServerBoard(os.path.join(folder, "not-a-board"))
        wrong = os.path.join(folder, "pegaflow-board-wrongsize")
        with open(wrong, "wb") as f:
            f.write(b"\1" * (BOARD_BYTES - 8))
        try:
            with pytest.raises(ValueError, match="not a completion board"):
                ServerBoard(wrong)
        finally:
            os.unlink(wrong)
        link = os.path.join(folder, "pegaflow-board-link")
        os.symlink(good.path, link)
        try:
            with pytest.raises(OSError):
                ServerBoard(link)  # O_NOFOLLOW: a link could point the server's writes anywhere
        finally:
            os.unlink(link)
        with pytest.raises(FileNotFoundError):
            ServerBoard(os.path.join(folder, "pegaflow-board-missing"))
    finally:
        good.unlink()


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(pool_size="8mb")
    yield srv
    srv.stop()


@pytest.fixture
def connect(server):
    """A client (options as PegaClient's) with one registered CPU cache; closed after the test."""
    made = []

    def make(**options):
        client = PegaClient(server.ipc, **{"timeout_s": 10.0, **options})
        made.append(client)
        cache = new_instance(client)
        register(client, cache)
        return client, cache

    yield make
    for client in made:
        client.close()


def _flush(client: PegaClient) -> None:
    """One round trip: the server takes its finished transfers (pushing their completions)
    before it answers, so every push is read by the time this returns."""
    client.stats()


def _board_count(client: PegaClient, count: int, timeout_s: float = 10.0) -> None:
    """Until the server has written ``count`` notices (reads of shared memory, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while int(client._board.words[0]) < count:
        assert time.monotonic() < deadline, f"the server wrote {int(client._board.words[0])} of {count} notices"
        os.sched_yield()
    assert int(client._board.words[0]) == count


@pytest.mark.parametrize("wait", [True, False])
def test_board_reports_each_transfer_once_and_before_its_push(connect, wait):
    client, cache = connect()
    assert client.server_info["board"] == "new" and client._board is not None
    assert not os.path.exists(client._board.path)  # unlinked once the server had mapped it
    expected = cache.backing.clone()
    held = hashes(4)
    client.save(cache.instance_id, 0, 1, [0, 1, 2, 3], held, wait=wait)
    _board_count(client, 1)
    client._scan_board()  # the board alone, no socket read
    (done,) = client._completions
    assert done.job_id == 1 and done.ok and done.num_blocks == 4 and done.nbytes == 4 * 2 * cache.page
    assert client.poll_completions() == [done]
    cache.refill()
    client.load(cache.instance_id, 0, 2, [5, 6, 7, 8], held, wait=wait)
    _board_count(client, 2)
    client._scan_board()
    (done,) = client.poll_completions()
    assert done.job_id == 2 and done.ok and done.num_blocks == 4
    assert torch.equal(cache.backing[:, 5:9], expected[:, 0:4])
    # Seen on the board: each push is still due, and is dropped when it comes.
    _flush(client)
    assert client.poll_completions() == []
    assert client._early == set() and client._noticed == {} and client._tagged == set()


def test_transfers_that_skip_or_miss_blocks_come_by_push_with_their_details(connect):
    client, cache = connect()
    held = hashes(2)
    client.save(cache.instance_id, 0, 1, [0, 1], held)
    assert wait_completion(client, 1).ok
    client.save(cache.instance_id, 0, 2, [0, 1], held)  # held already: skipped
    done = wait_completion(client, 2)
    assert done.ok and done.skipped == (0, 1)
    client.load(cache.instance_id, 0, 3, [4, 5], [held[0], hashes(1)[0]])  # the second is missing
    done = wait_completion(client, 3)
    assert not done.ok and done.missing == (1,)
    _flush(client)
    assert client.poll_completions() == [] and client._early == set() and client._noticed == {}


def test_a_job_id_reused_right_after_its_notice_is_accepted(connect):
    client, cache = connect()
    for i in range(20):  # the client sees each on the board, maybe before the loop took it
        client.save(cache.instance_id, 0, 7, [i % 16], hashes(1))
        assert wait_completion(client, 7).ok
    _flush(client)
    assert client.poll_completions() == []


def test_without_a_board_completions_come_by_push_alone(connect):
    client, cache = connect(board=False)
    assert client.server_info["board"] == "" and client._board is None
    client.save(cache.instance_id, 0, 1, [0], hashes(1))
    assert wait_completion(client, 1).ok
    assert client._early == set()


def test_transfers_go_by_the_fast_lane_and_come_back_by_zmq(connect):
    client, cache = connect()
    assert client._fast_path and client._fast_path == client.server_info["fast"]
    before = client.stats()["server"]["fast_messages"]
    expected = cache.backing.clone()
    held = hashes(3)
    client.save(cache.instance_id, 0, 1, [0, 1, 2], held)  # acknowledged: the reply comes by ZMQ
    assert wait_completion(client, 1).ok
    cache.refill()
    client.load(cache.instance_id, 0, 2, [3, 4, 5], held, wait=False)
    assert wait_completion(client, 2).ok
    assert torch.equal(cache.backing[:, 3:6], expected[:, 0:3])
    with pytest.raises(PegaServerError, match="out_of_range"):  # the error reply, by ZMQ
        client.load(cache.instance_id, 0, 3, [10**6], held[:1])
    stats = client.stats()["server"]
    assert stats["fast_messages"] - before == 3 and stats["board_notices"] >= 2


def test_without_the_fast_lane_transfers_go_by_zmq(connect):
    client, cache = connect(fast=False)
    before = client.stats()["server"]["fast_messages"]
    client.save(cache.instance_id, 0, 1, [0], hashes(1))
    assert wait_completion(client, 1).ok and client._fast_path == ""
    assert client.stats()["server"]["fast_messages"] == before


def test_a_fast_lane_transfer_of_an_ended_session_is_refused_not_dropped(connect):
    client, cache = connect(timeout_s=5.0)
    client._socket.send(msgpack.packb({"op": "bye", "id": 0}))  # the server ends the session
    client.stats()  # answered after the bye (stats needs no session)
    # A dropped datagram would end in PegaTimeoutError after 5 s; the server answers instead.
    with pytest.raises(PegaServerError, match="no_session"):
        client.save(cache.instance_id, 0, 1, [0], hashes(1))


def test_garbage_on_the_fast_lane_is_answered_or_dropped_and_the_server_keeps_serving(server):
    import random
    import socket

    client = PegaClient(server.ipc, timeout_s=10.0)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        client.hello()
        path = client.server_info["fast"]
        rng = random.Random(os.urandom(8))
        for i in range(300):
            body = os.urandom(rng.randrange(0, 300))
            prefix = client.session if i % 2 else b""  # half claim the live session
            sock.sendto(prefix + body, path)
        cache = new_instance(client)
        register(client, cache)
        client.save(cache.instance_id, 0, 1, [0], hashes(1))
        assert wait_completion(client, 1).ok
        assert client.stats()["server"]["errors"]  # counted, not crashed
    finally:
        sock.close()
        client.close()


def test_a_server_whose_fast_lane_cannot_bind_still_binds_its_zmq_endpoint(tmp_path):
    from pegaflow.server.loop import LoopConfig, ServerLoop

    # An ipc path of 104 bytes: ZMQ binds it, the fast lane's 109-byte path cannot be bound.
    folder = tmp_path / ("d" * (104 - len(str(tmp_path)) - len("/pega") - 1))
    folder.mkdir()
    path = str(folder / "pega")
    assert len(path) == 104
    loop = ServerLoop(LoopConfig(endpoint="ipc://" + path, tcp=None), engine=None, devices=())
    try:
        assert loop.bind() == ["ipc://" + path]
        assert loop.fast is None and loop.service.fast_path == ""
        assert os.path.exists(path) and not os.path.exists(path + ".fast")
    finally:
        loop._waker.close()
        loop.router.close()
        loop.ctx.term()
