"""The connector's parts that need neither vLLM nor a server: settings, the request state
machine, the back-off gate, and the scheduler side driven with stand-in requests."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest

from pegaflow.connector.config import ENV_ENDPOINT, ENV_INSTANCE_ID, ConnectorSettings
from pegaflow.connector.link import INVALID_REQUEST, BackoffGate, EngineLink, LinkRejected, LinkUnavailable
from pegaflow.connector.metadata import LoadJob, PegaWorkerMetadata, SaveJob
from pegaflow.connector.scheduler_side import ConnectorScheduler
from pegaflow.connector.tracker import RequestState, RequestTracker

BS = 4


# ---- settings ------------------------------------------------------------------------------


def test_settings_defaults_and_engine_id():
    s = ConnectorSettings.from_extra_config({}, engine_id="abc", env={})
    assert s.instance_id == "vllm-abc"
    assert s.save_decode_blocks


def test_settings_env_overrides_extra_config():
    env = {ENV_ENDPOINT: "tcp://10.0.0.1:5000", ENV_INSTANCE_ID: "inst-7"}
    s = ConnectorSettings.from_extra_config({"endpoint": "ipc:///x", "instance_id": "a"}, engine_id="e", env=env)
    assert (s.endpoint, s.instance_id) == ("tcp://10.0.0.1:5000", "inst-7")


@pytest.mark.parametrize(
    "extra, word",
    [
        ({"endpiont": "ipc:///x"}, "endpiont"),
        ({"endpoint": "http://x"}, "endpoint"),
        ({"rpc_timeout_s": 0}, "rpc_timeout_s"),
        ({"rpc_timeout_s": True}, "rpc_timeout_s"),
        ({"save_scope": "decode"}, "save_scope"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "retry_max_s"),
        ({"instance_id": ""}, "instance_id"),
    ],
)
def test_settings_reject_bad_values_by_name(extra, word):
    with pytest.raises(ValueError, match=word):
        ConnectorSettings.from_extra_config(extra, env={})


def test_importing_the_package_pulls_no_torch_or_vllm():
    code = (
        "import sys, pegaflow.connector, pegaflow.connector.scheduler_side;"
        "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, sorted(sys.modules)"
    )
    assert os.system(f"{sys.executable} -c \"{code}\"") == 0


# ---- the request state machine: one test per legal transition, and the illegal ones --------

LEGAL = [
    (RequestState.WAITING, "plan_load", RequestState.LOAD_PLANNED),
    (RequestState.WAITING, "start_running", RequestState.RUNNING),
    (RequestState.WAITING, "finish", RequestState.FINISHED),
    (RequestState.LOAD_PLANNED, "load_sent", RequestState.LOADING),
    (RequestState.LOAD_PLANNED, "finish", RequestState.FINISHED),
    (RequestState.LOADING, "load_done", RequestState.LOADED),
    (RequestState.LOADING, "load_failed", RequestState.WAITING),
    (RequestState.LOADING, "finish", RequestState.FINISHED),
    (RequestState.LOADED, "start_running", RequestState.RUNNING),
    (RequestState.LOADED, "finish", RequestState.FINISHED),
    (RequestState.RUNNING, "preempted", RequestState.WAITING),
    (RequestState.RUNNING, "finish", RequestState.FINISHED),
]


def _call(tracker: RequestTracker, event: str) -> None:
    if event == "plan_load":
        tracker.plan_load(3, [5, 6], [b"a", b"b"])
    else:
        getattr(tracker, event)()


@pytest.mark.parametrize("start, event, end", LEGAL, ids=[f"{a.name}-{e}" for a, e, _ in LEGAL])
def test_tracker_legal_transition(start, event, end):
    t = RequestTracker("r", state=start)
    _call(t, event)
    assert t.state is end


ILLEGAL = [
    (s, e)
    for s in RequestState
    for e in ("plan_load", "load_sent", "load_done", "load_failed", "start_running", "preempted", "finish")
    if not any(s is a and e == ev for a, ev, _ in LEGAL)
]


@pytest.mark.parametrize("start, event", ILLEGAL, ids=[f"{s.name}-{e}" for s, e in ILLEGAL])
def test_tracker_illegal_transition_names_the_state(start, event):
    t = RequestTracker("r", state=start)
    with pytest.raises(ValueError, match=start.name):
        _call(t, event)
    assert t.state is start


def test_tracker_load_bookkeeping_cleared_on_failure():
    t = RequestTracker("r")
    t.plan_load(9, [1, 2], [b"x", b"y"])
    t.load_sent()
    t.load_failed()
    assert (t.load_job_id, t.load_block_ids, t.load_hashes) == (None, [], [])
    with pytest.raises(ValueError, match="as many block ids"):
        RequestTracker("q").plan_load(1, [1], [])


def test_messages_validate_lengths():
    with pytest.raises(ValueError, match="LoadJob 1"):
        LoadJob(1, "r", (1, 2), (b"a",))
    with pytest.raises(ValueError, match="SaveJob 2"):
        SaveJob(2, (), ())
    a = PegaWorkerMetadata(saves_done={1: 1}, blocks_saved=2)
    b = PegaWorkerMetadata(saves_done={1: 1, 2: 1}, blocks_skipped=3, saves_failed=1)
    m = a.aggregate(b)
    assert (m.saves_done, m.blocks_saved, m.blocks_skipped, m.saves_failed) == ({1: 2, 2: 1}, 2, 3, 1)


# ---- back-off ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gate_warns_once_per_outage_and_backs_off(caplog):
    clock = Clock()
    gate = BackoffGate("test", 1.0, 4.0, clock)
    with caplog.at_level(logging.DEBUG, logger="pegaflow.connector.link"):
        gate.failed(OSError("x"))
        assert not gate.allows()
        clock.now += 1.0
        assert gate.allows()
        gate.failed(OSError("x"))  # still down: delay doubles, no second warning
        clock.now += 1.5
        assert not gate.allows()
        clock.now += 0.5
        gate.succeeded()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)


# ---- the scheduler side with stand-in requests ---------------------------------------------


class FakeClient:
    def __init__(self, held: int = 0) -> None:
        self.held = held
        self.queries: list[list[bytes]] = []
        self.dead = False

    def query(self, instance_id, hashes):
        if self.dead:
            raise TimeoutError("no reply")
        self.queries.append(list(hashes))
        return self.held

    def query_blob(self, instance_id, blob, hash_bytes):
        return self.query(instance_id, [blob[i : i + hash_bytes] for i in range(0, len(blob), hash_bytes)])

    def close(self):
        pass


class Pins:
    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def pin(self, ids):
        for i in ids:
            self.count[i] = self.count.get(i, 0) + 1

    def unpin(self, ids):
        for i in ids:
            self.count[i] -= 1
            assert self.count[i] >= 0
            if not self.count[i]:
                del self.count[i]


def make_scheduler(held=0, world_size=1, save_scope="all", clock=None):
    settings = ConnectorSettings(instance_id="i", save_scope=save_scope, retry_initial_s=1.0)
    client = FakeClient(held)
    link = EngineLink(settings, "test", client_factory=lambda s: client, clock=clock or Clock())
    pins = Pins()
    sched = ConnectorScheduler(settings, block_size=BS, world_size=world_size, link=link, pinner=pins)
    return sched, client, pins


def make_request(req_id: str, num_tokens: int, prompt: int | None = None):
    hashes = [f"{req_id[:1]}{i}".encode().ljust(32, b".") for i in range(num_tokens // BS)]
    return SimpleNamespace(
        request_id=req_id,
        block_hashes=hashes,
        num_tokens=num_tokens,
        num_prompt_tokens=prompt or num_tokens,
        num_computed_tokens=0,
        num_preemptions=0,
        num_in_flight_tokens=0,
    )


class BlockState:
    def __init__(self, tables):
        self.tables = tables

    def get_block_ids(self, req_id):
        return (self.tables[req_id],)


def step(sched, scheduled: dict[str, int], tables, preempted=()):
    out = SimpleNamespace(
        num_scheduled_tokens=scheduled, preempted_req_ids=set(preempted), kv_connector_block_state=BlockState(tables)
    )
    return sched.build_connector_meta(out)


def test_lookup_never_claims_the_last_token_and_skips_local_hit():
    sched, client, _ = make_scheduler(held=100)
    req = make_request("a", 16)  # 4 full blocks; the 4th holds the last token
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 4) == (8, True)  # blocks 1 and 2
    assert client.queries[-1] == req.block_hashes[1:3]
    assert sched.get_num_new_matched_tokens(req, 12) == (0, False)  # nothing left to ask


def test_lookups_send_the_requests_current_hashes_as_it_grows():
    sched, client, _ = make_scheduler(held=1)
    req = make_request("g", 4 * BS + 1)
    assert sched.get_num_new_matched_tokens(req, BS) == (BS, True)
    assert client.queries[-1] == req.block_hashes[1:4]
    req.block_hashes += [os.urandom(32) for _ in range(3)]  # vLLM appends as blocks fill
    req.num_tokens += 3 * BS
    sched.get_num_new_matched_tokens(req, 0)
    assert client.queries[-1] == req.block_hashes[:7]
    req.block_hashes[:] = [os.urandom(32) for _ in range(7)]  # not the list the blob came from
    sched.get_num_new_matched_tokens(req, 0)
    assert client.queries[-1] == req.block_hashes[:7]
    req.block_hashes[:] = [os.urandom(32) for _ in range(6)] + [os.urandom(16)]  # mixed lengths
    sched.get_num_new_matched_tokens(req, 0)
    assert client.queries[-1] == req.block_hashes[:7]


def test_arguments_the_client_refuses_are_a_rejection_not_an_outage():
    sched, client, _ = make_scheduler(held=2)

    def refuse(instance_id, hashes):
        raise ValueError("hashes must all have one length")

    client.query = refuse
    req = make_request("m", 3 * BS + 1)
    req.block_hashes[1] = req.block_hashes[1][:16]  # mixed lengths: the list path, refused
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.counters["lookup_errors"] == 1
    assert sched.link.available()  # the server was never asked: no back-off
    with pytest.raises(LinkRejected) as info:
        sched.link.call("query", "i", [b"x"])
    assert info.value.code == INVALID_REQUEST and "one length" in str(info.value)


def test_lookup_is_a_miss_while_the_server_is_down():
    clock = Clock()
    sched, client, _ = make_scheduler(held=3, clock=clock)
    req = make_request("a", 17)
    client.dead = True
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    client.dead = False
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # back-off: not even asked
    assert len(client.queries) == 0
    clock.now += 1.0
    assert sched.get_num_new_matched_tokens(req, 0) == (12, True)


def test_failed_load_bans_its_hashes_no_reload_loop():
    sched, client, _ = make_scheduler(held=3)
    req = make_request("a", 17)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (12, True)
    sched.update_state_after_alloc(req, [7, 8, 9, 10, 11], 12)
    meta = step(sched, {}, {})
    assert meta.loads == [LoadJob(meta.loads[0].job_id, "a", (7, 8, 9), tuple(req.block_hashes[:3]))]
    assert sched.trackers["a"].state is RequestState.LOADING
    sched.update_connector_output({"a"}, {"a"}, None)
    assert sched.trackers["a"].state is RequestState.WAITING
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # the server still says 3
    assert all(sched.is_banned(h) for h in req.block_hashes[:3])


def test_load_then_second_alloc_runs_and_does_not_resave_loaded_blocks():
    sched, _, pins = make_scheduler(held=2)
    req = make_request("a", 13)  # blocks 0..2 full
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (8, True)
    sched.update_state_after_alloc(req, [5, 6], 8)
    step(sched, {}, {})
    sched.update_connector_output({"a"}, set(), None)
    assert sched.trackers["a"].state is RequestState.LOADED
    sched.update_state_after_alloc(req, [], 0)
    assert sched.trackers["a"].state is RequestState.RUNNING
    req.num_computed_tokens = 8
    meta = step(sched, {"a": 5}, {"a": [5, 6, 7, 9]})
    assert meta.save is not None and meta.save.block_ids == (7,) and meta.save.hashes == (req.block_hashes[2],)
    assert pins.count == {7: 1}


def test_saves_cover_blocks_full_after_the_step_and_unpin_after_every_rank():
    sched, _, pins = make_scheduler(world_size=2)
    req = make_request("a", 10)  # prompt of 10 tokens: blocks 0, 1 full
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, [], 0)
    meta = step(sched, {"a": 6}, {"a": [3, 4, 5]})  # chunk 1: tokens 0..5 -> block 0 full
    assert meta.save.block_ids == (3,)
    first = meta.save.job_id
    req.num_computed_tokens = 6
    meta = step(sched, {"a": 4}, {"a": [3, 4, 5]})  # chunk 2: tokens 6..9 -> block 1 full
    assert meta.save.block_ids == (4,)
    assert pins.count == {3: 1, 4: 1}
    sched.update_connector_output(None, None, PegaWorkerMetadata(saves_done={first: 1}))
    assert pins.count == {3: 1, 4: 1}  # one rank of two
    sched.update_connector_output(None, None, PegaWorkerMetadata(saves_done={first: 1}))
    assert pins.count == {4: 1}
    assert sched.has_pending_saves()


def test_decode_blocks_saved_when_hashed_and_prompt_scope_stops_at_prompt():
    for scope, expect in (("all", (6,)), ("prompt", None)):
        sched, _, _ = make_scheduler(save_scope=scope)
        req = make_request("a", 8)
        sched.on_new_request(req)
        sched.update_state_after_alloc(req, [], 0)
        step(sched, {"a": 8}, {"a": [4, 5]})
        req.num_computed_tokens = 8
        # Decode: 4 more tokens appended; the block they fill is hashed once the last arrives.
        req.block_hashes.append(b"d2".ljust(32, b"."))
        req.num_tokens = 13
        req.num_computed_tokens = 11
        meta = step(sched, {"a": 1}, {"a": [4, 5, 6, 9]})
        assert (meta.save.block_ids if meta.save else None) == expect, scope


def test_request_finished_pins_unsaved_blocks_and_queues_them():
    sched, _, pins = make_scheduler()
    req = make_request("a", 8)
    sched.on_new_request(req)
    sched.update_state_after_alloc(req, [], 0)
    step(sched, {"a": 7}, {"a": [4, 5]})  # block 1 not full after this step: not saved
    req.num_computed_tokens = 8  # a later step computed it, but the request finished first
    assert sched.request_finished(req, [4, 5]) == (False, None)
    assert "a" not in sched.trackers and pins.count == {4: 1, 5: 1}
    meta = step(sched, {}, {})
    assert meta.save.block_ids == (5,)
    sched.update_connector_output(None, None, PegaWorkerMetadata(saves_done={meta.save.job_id: 1}))
    sched.update_connector_output(None, None, PegaWorkerMetadata(saves_done={1: 1}))
    assert pins.count == {} and not sched.has_pending_saves()


def test_preemption_keeps_the_cursor_and_readmission_works():
    sched, _, _ = make_scheduler()
    req = make_request("a", 12)
    sched.on_new_request(req)
    sched.update_state_after_alloc(req, [], 0)
    step(sched, {"a": 8}, {"a": [1, 2, 3]})
    req.num_preemptions, req.num_computed_tokens = 1, 0
    step(sched, {}, {}, preempted={"a"})
    assert sched.trackers["a"].state is RequestState.WAITING
    sched.get_num_new_matched_tokens(req, 8)
    sched.update_state_after_alloc(req, [], 0)
    req.num_computed_tokens = 8
    meta = step(sched, {"a": 4}, {"a": [7, 8, 9]})
    assert meta.save.block_ids == (9,)  # blocks 0 and 1 were saved before the preemption


def test_duplicate_hashes_in_one_step_are_saved_once():
    sched, _, pins = make_scheduler()
    a, b = make_request("a", 8), make_request("a2", 8)  # same first letter -> same hashes
    for r in (a, b):
        sched.on_new_request(r)
        sched.update_state_after_alloc(r, [], 0)
    meta = step(sched, {"a": 8, "a2": 8}, {"a": [1, 2], "a2": [3, 4]})
    assert meta.save.block_ids == (1, 2)
    assert pins.count == {1: 1, 2: 1}


def test_saves_dropped_while_the_server_is_down_release_pins():
    clock = Clock()
    sched, client, pins = make_scheduler(clock=clock)
    req = make_request("a", 9)
    sched.on_new_request(req)
    sched.update_state_after_alloc(req, [], 0)
    assert step(sched, {"a": 3}, {"a": [4, 5, 6]}).save is None
    client.dead = True
    with pytest.raises(LinkUnavailable):
        sched.link.call("query", "i", [])
    req.num_computed_tokens = 8
    sched.request_finished(req, [4, 5])
    assert pins.count == {4: 1, 5: 1}
    meta = step(sched, {}, {})
    assert meta.save is None and pins.count == {} and not sched.has_pending_saves()


def test_the_connector_declares_itself_a_host_cache_without_delivery_or_sleep_mode():
    pytest.importorskip("vllm")
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    from pegaflow.connector import PegaKVConnector

    assert PegaKVConnector._cache_hit_source is CacheHitSource.HOST
    assert PegaKVConnector.supports_sleep_mode(None) is False
    assert PegaKVConnector.requires_kv_delivery.fget(None) is False


def test_event_pool_exports_each_events_ipc_handle_once_and_forgets_a_discarded_one(monkeypatch):
    from pegaflow import sharing
    from pegaflow.connector.worker_side import EventPool

    exported: list[object] = []

    def share_event(event):
        exported.append(event)
        return b"h" + bytes([len(exported)]) * 63

    monkeypatch.setattr(sharing, "share_event", share_event)
    pool = EventPool(limit=2)
    a, b = object(), object()  # stand-ins: the pool only keys and returns them
    first = pool.handle(a)
    assert pool.handle(a) == first and pool.handle(b) != first
    pool.release(a)
    assert pool.handle(a) == first and exported == [a, b]  # reused: not exported again
    pool._made = 2
    pool.discard(b)
    assert pool._made == 1
    pool.handle(b)
    assert exported == [a, b, b]  # a discarded event is never served from the cache


def test_a_save_whose_event_cannot_be_shared_is_reported_failed_not_raised():
    from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry

    calls: list[str] = []
    client = SimpleNamespace(save=lambda *a, **k: calls.append("save"), close=lambda: None)
    settings = ConnectorSettings(instance_id="i")
    worker = ConnectorWorker(settings, EngineLink(settings, "test", client_factory=lambda s: client),
                             InstanceGeometry("i", "m", "auto", "LBNHC", BS, 1, False), rank=0)

    class Unshareable:
        def handle(self, event):
            raise RuntimeError("cudaIpcGetEventHandle failed")

        def discard(self, event):
            calls.append("discard")

    worker._events = Unshareable()
    worker._submit_save(SaveJob(5, (1, 2), (b"a" * 32, b"b" * 32)), event=object())
    meta = worker.take_worker_meta()
    assert calls == ["discard"] and meta.saves_done == {5: 1} and meta.saves_failed == 1
    assert meta.blocks_skipped == 2 and not worker.has_pending()


def test_transfers_go_without_waiting_and_their_refusals_come_back_as_completions():
    """With wait_for_acceptance false (the default) the worker sends saves and loads with
    wait=False; a refusal arrives as a completion with the server's code: the load fails (vLLM
    recomputes), a lost registration is noted (the next transfer registers again), and a
    refused or abandoned save's event is discarded, not reused."""
    from pegaflow.client import ABANDONED, Completion
    from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry

    sent: list[tuple[str, dict]] = []
    pending: list[Completion] = []

    def poll(timeout_s=0.0):
        out = list(pending)
        pending.clear()
        return out

    client = SimpleNamespace(load=lambda *a, **k: sent.append(("load", k)), save=lambda *a, **k: sent.append(("save", k)),
                             poll_completions=poll, close=lambda: None)
    assert ConnectorSettings().wait_for_acceptance is False
    with pytest.raises(ValueError, match="wait_for_acceptance"):
        ConnectorSettings(wait_for_acceptance="no")
    settings = ConnectorSettings(instance_id="i", wait_for_acceptance=False)
    worker = ConnectorWorker(settings, EngineLink(settings, "test", client_factory=lambda s: client),
                             InstanceGeometry("i", "m", "auto", "LBNHC", BS, 1, False), rank=0)
    worker._registered = True  # as after register_kv_caches
    events: list[str] = []

    class Events:
        def handle(self, event):
            return b"h"

        def release(self, event):
            events.append("release")

        def discard(self, event):
            events.append("discard")

    worker._events = Events()
    worker._submit_load(LoadJob(1, "r1", (0,), (b"a" * 32,)))
    worker._submit_save(SaveJob(2, (1,), (b"b" * 32,)), event=object())
    worker._submit_save(SaveJob(3, (2,), (b"c" * 32,)), event=object())
    worker._submit_save(SaveJob(4, (3,), (b"d" * 32,)), event=object())
    assert [k["wait"] for _, k in sent] == [False] * 4
    pending += [Completion(1, "load", False, error="unknown_instance: gone", code="unknown_instance"),
                Completion(2, "save", False, error="out_of_range: block", code="out_of_range"),
                Completion(3, "save", False, error="connection replaced", code=ABANDONED),
                Completion(4, "save", True, num_blocks=1)]
    worker.collect()
    finished, failed = worker.take_transfer_results()
    assert finished == {"r1"} and failed == {"r1"}
    assert worker._registered is False  # registers again before the next transfer
    assert events == ["discard", "discard", "release"]
    meta = worker.take_worker_meta()
    assert meta.saves_done == {2: 1, 3: 1, 4: 1} and meta.saves_failed == 2 and meta.blocks_skipped == 2
    assert not worker.has_pending()
