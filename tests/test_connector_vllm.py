"""PegaKVConnector against vLLM 0.33's real scheduler and a real PegaFlow server (CPU mode).

Scenarios: a saved prefix is loaded bit for bit after a GPU prefix-cache reset (every
layout, two TP ranks, MLA stored once); the async load path; preemption while loads and
saves are in flight; the server killed mid-run.
"""

from __future__ import annotations

import random
import signal

import pytest

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus  # noqa: E402

from pegaflow.connector.tracker import RequestState  # noqa: E402
from pegaflow.server.spawn import ServerProcess  # noqa: E402
from vllm_harness import (  # noqa: E402
    BLOCK_SIZE,
    Engine,
    HeldCompletions,
    Worker,
    assert_scheduler_empty,
    make_request,
    make_setup,
)

PREFIX_BLOCKS = 4


@pytest.fixture(scope="module")
def server():
    with ServerProcess(pool_size="64mb") as srv:
        yield srv


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


def save_prefix(engine: Engine, prefix: list[int], req_id: str = "A") -> list[list[bytes]]:
    """Run a request over ``prefix`` + a tail, wait for its saves, reset vLLM's prefix cache
    and scramble the KV caches; returns each rank's bytes of the prefix's blocks."""
    engine.add(make_request(req_id, prefix + [1, 2, 3], max_tokens=2))
    engine.run()
    table = engine.tables[req_id][: len(prefix) // BLOCK_SIZE]
    pages = [[w.block_bytes(b) for b in table] for w in engine.workers]
    assert engine.scheduler.reset_prefix_cache(), "a pinned or leaked block kept the reset from succeeding"
    for w in engine.workers:
        w.scramble()
    return pages


def watch_loads(engine: Engine, req_id: str) -> dict[str, list]:
    """At the step its load is reported, record every rank's load-target pages and whether
    every other block kept its bytes (a load writes only its own blocks)."""
    seen: dict[str, list] = {}
    before = [[w.block_bytes(b) for b in range(w.regions.num_blocks)] for w in engine.workers]

    def on_loaded(ids: set[str]) -> None:
        if req_id not in ids or "pages" in seen:
            return
        targets = engine.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        seen["pages"] = [[w.block_bytes(b) for b in targets] for w in engine.workers]
        seen["others_untouched"] = [
            all(w.block_bytes(b) == before[r][b] for b in range(w.regions.num_blocks) if b not in targets)
            for r, w in enumerate(engine.workers)
        ]

    engine.on_loads_done = on_loaded
    return seen


CASES = [
    pytest.param("LBNHC", 1, False, id="LBNHC"),
    pytest.param("LBHNC", 1, False, id="LBHNC"),
    pytest.param("BLNHC", 1, False, id="BLNHC"),
    pytest.param("LBNHC", 2, False, id="LBNHC-tp2"),
    pytest.param("LBNHC", 2, True, id="MLA-tp2"),
]


@pytest.mark.parametrize("layout, tp, mla", CASES)
def test_prefix_saved_then_loaded_bit_identical(server, layout, tp, mla):
    setup = make_setup(server.ipc, layout=layout, tp=tp, mla=mla, instance_id=f"hit-{layout}-{tp}-{mla}")
    engine = Engine(setup, [Worker(setup, rank) for rank in range(tp)])
    prefix = tokens(hash((layout, tp, mla)) & 0xFFFF, PREFIX_BLOCKS * BLOCK_SIZE)
    saved = save_prefix(engine, prefix)
    if tp == 2:
        # MLA: identical pages on both ranks, stored once; attention: each rank its shard.
        assert (saved[0] == saved[1]) is mla

    seen = watch_loads(engine, "B")
    engine.add(make_request("B", prefix + tokens(7, 7), max_tokens=3))
    engine.run()

    assert seen["pages"] == saved, "the pages loaded into B's blocks differ from A's"
    assert all(seen["others_untouched"])
    assert {"B": 7} in engine.log.scheduled  # only the tail was computed
    totals = sum_stats(engine)
    assert totals["lookup_hit_blocks"] == PREFIX_BLOCKS and totals["loads"] == 1
    assert totals.get("loads_failed", 0) == 0
    stored_ranks = 1 if mla else tp
    assert totals["save_blocks_done"] >= PREFIX_BLOCKS * stored_ranks
    assert_scheduler_empty(engine)


def test_a_connector_reset_drops_the_saved_prefix_so_it_is_recomputed(server):
    setup = make_setup(server.ipc, instance_id="reset", extra={"namespace": "reset-test"})
    engine = Engine(setup, [Worker(setup)])
    prefix = tokens(21, PREFIX_BLOCKS * BLOCK_SIZE)
    save_prefix(engine, prefix)
    # New weights: vLLM resets its prefix cache and the connector's.
    assert engine.scheduler.reset_prefix_cache(reset_connector=True)
    engine.add(make_request("B", prefix + tokens(22, 7), max_tokens=2))
    engine.run()
    totals = sum_stats(engine)
    assert totals.get("lookup_hit_blocks", 0) == 0 and totals.get("loads", 0) == 0
    assert {"B": PREFIX_BLOCKS * BLOCK_SIZE + 7} in engine.log.scheduled  # all of it computed
    assert_scheduler_empty(engine)


def sum_stats(engine: Engine) -> dict[str, int]:
    totals: dict[str, int] = {}
    for payload in engine.stats:
        for k, v in payload.items():
            totals[k] = totals.get(k, 0) + v
    return totals


def test_async_load_waits_for_remote_kvs_then_runs(server):
    setup = make_setup(server.ipc, instance_id="async")
    engine = Engine(setup, [Worker(setup)])
    prefix = tokens(11, PREFIX_BLOCKS * BLOCK_SIZE)
    save_prefix(engine, prefix)
    held = HeldCompletions(engine.workers[0])
    sched_side = engine.connector._scheduler

    engine.add(make_request("B", prefix + tokens(12, 5), max_tokens=2))
    engine.step()
    assert engine.status("B") is RequestStatus.WAITING_FOR_REMOTE_KVS
    assert sched_side.trackers["B"].state is RequestState.LOADING
    for _ in range(3):  # the load is in flight: B is not scheduled, whatever the steps
        assert "B" not in engine.step().num_scheduled_tokens
    held.holding = False
    engine.run(until=lambda: sched_side.trackers["B"].state is not RequestState.LOADING)
    assert sched_side.trackers["B"].state is RequestState.LOADED
    so = engine.step()
    assert so.num_scheduled_tokens.get("B") == 5
    assert sched_side.trackers["B"].state is RequestState.RUNNING
    engine.run()
    assert_scheduler_empty(engine)


def test_preemption_while_loads_and_saves_in_flight(server):
    # 11 usable blocks: R1 grows until vLLM must preempt it while its save and R2's load are
    # held in flight; the blocks the save reads stay pinned, and everything finishes.
    setup = make_setup(server.ipc, instance_id="preempt", num_blocks=12)
    engine = Engine(setup, [Worker(setup)])
    prefix = tokens(21, 3 * BLOCK_SIZE)
    saved = save_prefix(engine, prefix)
    held = HeldCompletions(engine.workers[0])
    sched_side = engine.connector._scheduler
    pool = engine.scheduler.kv_cache_manager.block_pool
    seen = watch_loads(engine, "R2")

    engine.add(make_request("R1", tokens(22, 6 * BLOCK_SIZE - 1), max_tokens=40))
    engine.add(make_request("R2", prefix + tokens(23, 10), max_tokens=2))
    engine.step()
    assert engine.status("R2") is RequestStatus.WAITING_FOR_REMOTE_KVS
    saves = list(sched_side._inflight_saves.values())
    assert saves, "R1's prompt blocks should be saving"
    pinned = set(saves[0].job.block_ids)

    engine.run(until=lambda: engine.scheduler.requests["R1"].num_preemptions > 0, max_s=20)
    # R1 was preempted with its save in flight: its saved blocks are still held.
    assert all(pool.blocks[b].ref_cnt >= 1 for b in pinned)
    assert sched_side.trackers["R1"].state in (RequestState.WAITING, RequestState.RUNNING)
    assert sched_side.trackers["R2"].state is RequestState.LOADING

    held.holding = False
    engine.run(max_s=30)
    assert seen["pages"][0][: len(saved[0])] == saved[0]
    assert_scheduler_empty(engine)


def test_server_killed_mid_run_requests_recompute_and_finish(server, caplog):
    srv = ServerProcess(pool_size="16mb")
    try:
        extra = {"rpc_timeout_s": 0.3, "transfer_timeout_s": 1.0, "retry_initial_s": 0.2, "retry_max_s": 1.0}
        setup = make_setup(srv.ipc, instance_id="killed", extra=extra)
        engine = Engine(setup, [Worker(setup)])
        prefix = tokens(31, PREFIX_BLOCKS * BLOCK_SIZE)
        save_prefix(engine, prefix)
        held = HeldCompletions(engine.workers[0])  # the dead server's completions never arrive

        engine.add(make_request("B", prefix + tokens(32, 9), max_tokens=3))  # a hit: loads
        engine.add(make_request("C", tokens(33, 3 * BLOCK_SIZE + 2), max_tokens=3))  # saves
        engine.workers[0].after_save = lambda: srv.proc.send_signal(signal.SIGKILL)
        engine.step()
        srv.proc.wait(10)
        assert engine.status("B") is RequestStatus.WAITING_FOR_REMOTE_KVS
        engine.add(make_request("D", prefix + tokens(34, 4), max_tokens=2))  # lookup: a miss

        engine.run(max_s=30)
        totals = sum_stats(engine)
        assert totals["loads_failed"] == 1 and totals["saves_failed"] >= 1
        assert totals["lookup_errors"] >= 1
        assert_scheduler_empty(engine)
        outage = [r.getMessage() for r in caplog.records if "unreachable from" in r.getMessage()]
        for side in ("scheduler", "worker rank 0"):  # one warning per side, not one per call
            assert sum(f"from the {side} (" in m for m in outage) <= 1, outage
    finally:
        srv.stop(signal.SIGKILL)


def test_stats_aggregate_and_export_to_prometheus(server):
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from pegaflow.connector.connector import PegaKVConnector

    a = PegaKVConnector.build_kv_connector_stats({"loads": 1, "save_blocks": 4, "pinned_blocks": 3})
    b = PegaKVConnector.build_kv_connector_stats({"loads": 2, "pinned_blocks": 1})
    assert a.aggregate(b).reduce() == {"loads": 3, "save_blocks": 4, "pinned_blocks": 1}
    assert PegaKVConnector.build_kv_connector_stats({}).is_empty()

    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    setup = make_setup(server.ipc, instance_id="prom")
    prom = PegaKVConnector.build_prom_metrics(setup.vllm_config, types, ["engine"], {0: ["0"]})
    prom.observe({"loads": 3, "pinned_blocks": 5, "unknown": 1}, 0)
    prom.observe({"loads": 2, "pinned_blocks": 2}, 0)
    assert registry.get_sample_value("vllm:pegaflow_loads_total", {"engine": "0"}) == 5
    assert registry.get_sample_value("vllm:pegaflow_pinned_blocks", {"engine": "0"}) == 2
