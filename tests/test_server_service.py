"""The service's bookkeeping without sockets: expiry with copies in flight, lost jobs, bye.

The engine is a stand-in whose transfers finish only when the test says so, so the order of
events (expiry before completion) is exact rather than raced.
"""

from __future__ import annotations

import os
import threading
import time

import msgpack
import torch

from pegaflow.engine import TransferHandle, TransferResult
from pegaflow.engine.index import BlockIndex
from pegaflow.server import protocol as P
from pegaflow.server.service import TOUCH_SLICE, Service
from pegaflow.sharing import handle_to_wire, share_storage

ME = b"P" + b"m" * 15


class HeldEngine:
    """Registers anything; every save/load stays in flight until :meth:`finish`."""

    def __init__(self) -> None:
        self.handles: list[TransferHandle] = []
        self.kv: dict[tuple[str, int], object] = {}
        self.unregistered_kv: list[tuple[str, int]] = []

    def register_instance(self, spec):
        return spec.namespace

    def register_kv(self, instance_id, rank, kv, device=None):
        self.kv[(instance_id, rank)] = kv

    def unregister_kv(self, instance_id, rank):
        self.kv.pop((instance_id, rank), None)
        self.unregistered_kv.append((instance_id, rank))

    def save(self, instance_id, rank, block_ids, hashes, after_event=None):
        self.handles.append(TransferHandle())
        return self.handles[-1]

    load = save

    def unregister(self, instance_id):
        pass

    def stats(self):
        return {}

    def finish(self) -> None:
        for handle in self.handles:
            handle._complete(TransferResult(ok=True, num_blocks=1, nbytes=256))


def call(service: Service, now: float, **message) -> dict | None:
    reply = service.handle_frame(ME, msgpack.packb(message, use_bin_type=True), now)
    service.start_deferred()
    return None if reply is None else msgpack.unpackb(reply)


def setup(now: float = 0.0) -> tuple[Service, HeldEngine, torch.Tensor]:
    engine = HeldEngine()
    service = Service(engine, devices=(), client_timeout_s=4.0)
    assert call(service, now, op="hello", id=1, version=P.PROTOCOL_VERSION, pid=os.getpid())["ok"]
    assert call(service, now, op="register_instance", id=2, instance_id="i", model="m", kv_dtype="d", layout="l",
                block_size=16, page_bytes=[256])["ok"]
    backing = torch.zeros(8 * 256, dtype=torch.int8)
    reply = call(service, now, op="register_kv_caches", id=3, instance_id="i", rank=0,
                 storage=handle_to_wire(share_storage(backing)), regions=[[0, 256, 256]], num_blocks=8)
    assert reply["ok"], reply
    return service, engine, backing


def save(service: Service, now: float, job_id: int) -> dict:
    return call(service, now, op="save", id=10 + job_id, instance_id="i", rank=0, job_id=job_id, block_ids=[1],
                hashes=os.urandom(32), hash_bytes=32)


def test_an_expired_session_releases_its_registration_only_after_its_copies():
    service, engine, _ = setup()
    assert save(service, 0.0, job_id=7)["ok"]
    service.sweep(3.9)  # not yet silent for the client timeout
    assert service.sessions and service.registrations
    service.sweep(4.1)
    assert not service.sessions and not service.registrations  # no new transfers for it
    assert service.open_mappings == 1 and engine.unregistered_kv == []  # the copy still reads the mapping
    engine.finish()
    assert service.completions() == []  # nobody to tell
    assert service.open_mappings == 0 and engine.unregistered_kv == [("i", 0)]
    assert service.counters.sessions_expired == 1


def test_a_client_back_after_expiry_hears_of_its_lost_jobs():
    service, engine, _ = setup()
    assert save(service, 0.0, job_id=7)["ok"]
    service.sweep(10.0)
    reply = call(service, 10.5, op="save", id=20, instance_id="i", rank=0, job_id=8, block_ids=[1],
                 hashes=os.urandom(32), hash_bytes=32)
    assert reply["code"] == P.NO_SESSION
    hello = call(service, 11.0, op="hello", id=21, version=P.PROTOCOL_VERSION)
    assert hello["ok"] and hello["lost_jobs"] == [7] and hello["resumed"] is False
    assert call(service, 11.0, op="hello", id=22, version=P.PROTOCOL_VERSION)["lost_jobs"] == []
    backing = torch.zeros(2048, dtype=torch.int8)  # held: its segment lives as long as it does
    assert call(service, 11.0, op="register_kv_caches", id=23, instance_id="i", rank=0,
                storage=handle_to_wire(share_storage(backing)),
                regions=[[0, 256, 256]], num_blocks=8)["ok"], service.counters.errors
    assert save(service, 11.0, job_id=7)["code"] == P.DUPLICATE_JOB  # the lost job 7 still runs
    engine.finish()
    assert service.completions() == []  # job 7 was reported lost: never reported again


def test_heartbeats_keep_a_session_alive():
    service, _, _ = setup()
    for now in (3.0, 6.0, 9.0):
        assert call(service, now, op="heartbeat", id=0, session=ME) is None
        service.sweep(now + 0.5)
    assert service.sessions and service.registrations


def test_bye_releases_at_once_and_completions_go_to_live_sessions_only():
    service, engine, _ = setup()
    assert save(service, 0.0, job_id=1)["ok"]
    engine.finish()
    (identity, frame), = service.completions()
    assert identity == ME and msgpack.unpackb(frame)["job_id"] == 1
    assert call(service, 0.0, op="bye", id=0) is None
    assert not service.sessions and not service.registrations and service.open_mappings == 0


def test_shutdown_fails_jobs_still_in_flight_with_a_message():
    service, engine, _ = setup()
    assert save(service, 0.0, job_id=3)["ok"]
    service.stopping = True
    assert call(service, 0.0, op="query", id=30, instance_id="i", hashes=b"", hash_bytes=32)["code"] == P.SHUTTING_DOWN
    assert call(service, 0.0, op="health", id=31)["status"] == "stopping"
    (identity, frame), = service.fail_inflight("the server shut down")
    pushed = msgpack.unpackb(frame)
    assert pushed["job_id"] == 3 and pushed["ok"] is False and "shut down" in pushed["error"]
    service.close_all()
    assert service.open_mappings == 0


def test_a_completion_on_the_loop_thread_wakes_nothing_one_on_an_engine_thread_wakes_the_loop():
    service, engine, _ = setup()
    wakes: list[int] = []
    service._wake = lambda: wakes.append(1)
    assert save(service, 0.0, job_id=1)["ok"]
    engine.finish()  # on this thread: the loop's (it built the service)
    assert wakes == [] and service.has_completions
    (_, frame), = service.completions()
    assert msgpack.unpackb(frame)["job_id"] == 1 and not service.has_completions
    assert save(service, 0.0, job_id=2)["ok"]
    finisher = threading.Thread(target=engine.handles[-1]._complete,
                                args=(TransferResult(ok=True, num_blocks=1, nbytes=256),))
    finisher.start()
    finisher.join()
    assert wakes == [1]
    (_, frame), = service.completions()
    assert msgpack.unpackb(frame)["job_id"] == 2


def test_a_transfer_done_when_started_is_pushed_from_its_start():
    service, engine, _ = setup()
    pushed: list[tuple[bytes, bytes]] = []
    service.push = pushed.extend
    engine.save = lambda *a, **k: TransferHandle.completed(TransferResult(ok=True, num_blocks=1, nbytes=256))
    assert save(service, 0.0, job_id=4)["ok"]  # call() runs start_deferred, as the loop does
    (identity, frame), = pushed
    assert identity == ME and msgpack.unpackb(frame)["job_id"] == 4 and not service.has_completions
    assert save(service, 0.0, job_id=5)["ok"] and len(pushed) == 2  # every one, once


def _query(service: Service, hashes: list[bytes], request_id: int = 9) -> dict:
    reply = call(service, 0.0, op="query", id=request_id, instance_id="i", hashes=b"".join(hashes), hash_bytes=32)
    assert reply is not None and reply["ok"], reply
    return reply


def test_query_refreshes_wait_for_an_idle_loop_and_stop_when_a_message_comes():
    service, engine, _ = setup()
    engine.index = index = BlockIndex(1 << 20, 30.0)
    namespace = service.namespaces["i"]
    held = [os.urandom(32) for _ in range(300)]
    index.complete_save(index.prepare_save(namespace, held, 0, 1, 256), True)
    waits: list[int] = []
    service.input_waiting = lambda: waits.append(0) or True  # the loop's: a message always waits
    assert _query(service, held)["hits"] == 300
    # Nothing applied and no wait after the reply: the loop waits in its receive.
    assert service.touches_pending and index.pending_touches() == 300 and waits == []
    service.apply_idle_touches()  # one slice, then the waiting message goes first
    assert waits == [0] and service.touches_pending and index.pending_touches() == 300 - TOUCH_SLICE
    service.input_waiting = lambda: False
    service.apply_idle_touches()
    assert not service.touches_pending and index.pending_touches() == 0
    service.input_waiting = None  # no loop: applied at once
    assert _query(service, [os.urandom(32)] + held)["hits"] == 0
    assert _query(service, held[100:])["hits"] == 200
    assert not service.touches_pending and index.pending_touches() == 0
    assert index.lru_keys() == [(namespace, h) for h in held]


def test_the_loop_applies_query_refreshes_once_idle(tmp_path):
    from pegaflow.client import PegaClient
    from pegaflow.engine import Engine, EngineConfig
    from pegaflow.server.loop import LoopConfig, ServerLoop

    endpoint = f"ipc://{tmp_path}/s.sock"
    loop = ServerLoop(LoopConfig(endpoint=endpoint, tcp=None, client_timeout_s=30.0),
                      Engine(EngineConfig(pool_bytes=1 << 20)), ())
    loop.bind()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    index = loop.service.engine.index
    try:
        with PegaClient(endpoint, timeout_s=10.0, heartbeat=False) as client:
            namespace = client.register_instance("i", model="m", kv_dtype="int8", layout="l", block_size=16,
                                                 page_bytes=[256])
            held = [os.urandom(32) for _ in range(500)]
            index.complete_save(index.prepare_save(namespace, held, 0, 1, 256), True)
            for round_ in range(3):
                assert client.query("i", held[round_:]) == 500 - round_
                deadline = time.monotonic() + 10.0  # applied ~1 ms after the reply: wait for that
                while index.pending_touches() and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert index.pending_touches() == 0
                assert client.health()["status"] == "ok"  # and the loop serves on
            assert index.lru_keys() == [(namespace, h) for h in held[:2] + held[2:]]
    finally:
        loop.request_stop()
        thread.join(30)
    assert not thread.is_alive()
