"""The connector's worker side under server restarts and a rank held by another client,
driven by vLLM 0.33's real scheduler (tests/vllm_harness.py) and real CPU-mode servers."""

from __future__ import annotations

import random
import signal
import tempfile
import time

import pytest

pytest.importorskip("vllm")

from pegaflow.client import PegaClient  # noqa: E402
from pegaflow.server.spawn import ServerProcess  # noqa: E402
from vllm_harness import BLOCK_SIZE, Engine, Worker, make_request, make_setup  # noqa: E402

PREFIX_BLOCKS = 3
FAST = {"rpc_timeout_s": 0.5, "transfer_timeout_s": 3.0, "retry_initial_s": 0.1, "retry_max_s": 0.2}


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


def run_prefix(engine: Engine, req_id: str, prefix: list[int]) -> list[bytes]:
    """Run a request over ``prefix`` + a tail; returns the prefix blocks' bytes, then resets
    vLLM's prefix cache and scrambles the KV cache so only PegaFlow can give them back."""
    engine.add(make_request(req_id, prefix + [1, 2, 3], max_tokens=2))
    engine.run()
    table = engine.tables[req_id][: len(prefix) // BLOCK_SIZE]
    pages = [engine.workers[0].block_bytes(b) for b in table]
    assert engine.scheduler.reset_prefix_cache()
    engine.workers[0].scramble()
    return pages


def loaded_pages(engine: Engine, req_id: str, prompt: list[int]) -> list[bytes]:
    seen: dict[str, list[bytes]] = {}

    def on_loaded(ids: set[str]) -> None:
        if req_id in ids and "pages" not in seen:
            targets = engine.scheduler.kv_cache_manager.get_block_ids(req_id)[0][:PREFIX_BLOCKS]
            seen["pages"] = [engine.workers[0].block_bytes(b) for b in targets]

    engine.on_loads_done = on_loaded
    engine.add(make_request(req_id, prompt, max_tokens=2))
    engine.run()
    engine.on_loads_done = None
    return seen.get("pages", [])


def test_a_restarted_server_gets_the_worker_registered_again_by_itself():
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='pf-')}/engine.sock"
    first = ServerProcess("--endpoint", endpoint, pool_size="16mb")
    second = None
    try:
        setup = make_setup(endpoint, instance_id="restart", extra=FAST)
        engine = Engine(setup, [Worker(setup)])
        run_prefix(engine, "A", tokens(1, PREFIX_BLOCKS * BLOCK_SIZE))
        first.stop(signal.SIGKILL)
        second = ServerProcess("--endpoint", endpoint, pool_size="16mb")
        # The first saves after the restart find no registration and fail; the worker registers
        # again by itself. Run requests until the new server holds a registration.
        with PegaClient(endpoint, timeout_s=10.0) as observer:
            deadline = time.monotonic() + 20.0  # the worker's socket reconnects after its back-offs
            i = 0
            while observer.stats()["server"]["registrations"] != 1 and time.monotonic() < deadline:
                run_prefix(engine, f"warm{i}", tokens(100 + i, BLOCK_SIZE))
                i += 1
            assert observer.stats()["server"]["registrations"] == 1, "the worker never registered again"
            prefix = tokens(2, PREFIX_BLOCKS * BLOCK_SIZE)
            saved = run_prefix(engine, "B", prefix)
            assert loaded_pages(engine, "C", prefix + tokens(3, 5)) == saved, "no bit-exact hit after the restart"
            assert observer.stats()["server"]["saves"] >= 1
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


def test_a_rank_still_held_by_a_dead_worker_backs_off_instead_of_failing_every_transfer():
    """A restarted vLLM's rank finds its predecessor's registration still alive: it must not
    take that for success (each save would then fail with not_registered and re-register)."""
    with ServerProcess(pool_size="16mb", client_timeout=30.0) as server:
        setup = make_setup(server.ipc, instance_id="held", extra=FAST)
        old = Engine(setup, [Worker(setup)])
        run_prefix(old, "A", tokens(4, PREFIX_BLOCKS * BLOCK_SIZE))  # the old worker holds rank 0
        with PegaClient(server.ipc, timeout_s=10.0) as observer:
            errors_before = dict(observer.stats()["server"]["errors"])
            new = Engine(setup, [Worker(setup)])
            for i in range(4):
                run_prefix(new, f"n{i}", tokens(200 + i, 2 * BLOCK_SIZE))
            errors = observer.stats()["server"]["errors"]
            assert errors.get("not_registered", 0) == errors_before.get("not_registered", 0), errors
            assert errors.get("already_registered", 0) > errors_before.get("already_registered", 0), errors
            # The old worker goes (bye): the new one registers after its back-off and saves work.
            # Waited on by the new worker's own state: the server's count reads 1 both before
            # the bye lands (the old registration) and after the new one registered.
            old.workers[0].connector._worker.shutdown()
            new_side = new.workers[0].connector._worker
            deadline = time.monotonic() + 20.0
            i = 0
            while not new_side._registered and time.monotonic() < deadline:
                run_prefix(new, f"m{i}", tokens(300 + i, BLOCK_SIZE))
                i += 1
            assert new_side._registered, "the new worker never registered after the old one left"
            assert observer.stats()["server"]["registrations"] == 1
            prefix = tokens(6, PREFIX_BLOCKS * BLOCK_SIZE)
            saved = run_prefix(new, "B", prefix)
            assert loaded_pages(new, "C", prefix + tokens(7, 5)) == saved
