"""Reliability figures of the real server in CPU mode: faults, bad input, sustained load.

    python bench/reliability.py --json bench/results/reliability.json            # the full campaign
    python bench/reliability.py --procs 3 --requests 200 --frames 5000           # a quick look

* faults: the server SIGKILLed during saves and during loads (the client's next call fails
  within its deadline, later ones at once), restarted on the same endpoint (the same client
  object carries on), a client SIGKILLed mid-transfer (its pins, mappings and registration
  released), the pool overrun many times by saves (eviction keeps every save and load working).
* fuzz: random, mutated and hypothesis-drawn frames sent in batches on one connection; every
  frame must get exactly the replies the protocol promises (one, or none for heartbeat and
  bye), and the server must be alive after.
* sustained load: N client processes x M mixed requests (query, save, load) on real shared
  CPU KV caches; every accepted save and load must complete exactly once, every block loaded
  must hash to what was saved under that hash, and at the end no pin, job, registration or
  mapping is left and the pool's bytes add up.

The scenario functions raise AssertionError on a failure; tests/test_reliability.py runs the
small variants. Nothing here sends traffic anywhere but this host.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz generators and the raw DEALER of the server tests

from common import Row, arg_parser, print_table, write_json  # noqa: E402

from pegaflow.client import PegaClient, PegaClientError, PegaServerError, PegaTimeoutError  # noqa: E402
from pegaflow.server import protocol as P  # noqa: E402
from pegaflow.server.spawn import ServerProcess, kill_quietly  # noqa: E402

PAGE = 1024  # bytes per page; two regions, so a block is 2 KiB
MAX_INFLIGHT = 8  # saves and loads a load client keeps in flight


# ---- helpers ------------------------------------------------------------------------------------


def fresh_endpoint() -> str:
    return f"ipc://{tempfile.mkdtemp(prefix='pf-')}/engine.sock"  # short: IPC paths fit in 107 bytes


def cpu_cache(blocks: int, page: int = PAGE) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """A two-region int8 cache ``[2, blocks, page]`` of random bytes and its regions."""
    backing = torch.randint(-128, 128, (2, blocks, page), dtype=torch.int8)
    return backing, [(r * blocks * page, page, page) for r in range(2)]


def block_hash(backing: torch.Tensor, block: int) -> bytes:
    """A block's content hash: a load is right iff the block then hashes to the hash it loaded."""
    return hashlib.blake2b(backing[:, block].contiguous().numpy().tobytes(), digest_size=32).digest()


def register(client: PegaClient, instance_id: str, backing: torch.Tensor, regions, model: str = "rel") -> None:
    page = regions[0][2]
    client.register_instance(instance_id, model=model, kv_dtype="int8", layout="LBNHC", block_size=16,
                             page_bytes=[page, page])
    client.register_kv_caches(instance_id, 0, backing, regions, backing.shape[1])


def wait_jobs(client: PegaClient, jobs: set[int], timeout_s: float) -> dict[int, Any]:
    """Completions of ``jobs`` (all of them, or AssertionError at the deadline)."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while set(got) != jobs:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no completion for jobs {sorted(jobs - set(got))} within {timeout_s} s"
        for c in client.poll_completions(timeout_s=remaining):
            assert c.job_id not in got, f"two completions for job {c.job_id}"
            got[c.job_id] = c
    return got


def wait_for(predicate, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)  # polling a server's stats, not synchronising with it


def released(stats: dict, sessions: int) -> bool:
    srv, eng = stats["server"], stats["engine"]
    return (srv["registrations"] == 0 and srv["open_mappings"] == 0 and srv["inflight_jobs"] == 0
            and srv["sessions"] == sessions and eng["entries_pinned"] == 0 and eng["loads_pinned"] == 0
            and eng["entries_writing"] == 0)


# ---- faults -------------------------------------------------------------------------------------


def kill_server_during(op: str, timeout_s: float = 1.0) -> dict[str, Any]:
    """SIGKILL the server right after a big save (or load) was accepted: the client's next call
    raises within its deadline, the ones after it fail at once; nothing hangs."""
    server = ServerProcess(pool_size="64mb")
    try:
        client = PegaClient(server.ipc, timeout_s=timeout_s, name=f"kill-during-{op}")
        backing, regions = cpu_cache(512, 16 << 10)  # 16 MiB: a copy long enough to be caught in flight
        register(client, "victim", backing, regions)
        hashes = [os.urandom(32) for _ in range(512)]
        client.save("victim", 0, 1, list(range(512)), hashes)
        if op == "load":
            assert wait_jobs(client, {1}, 30.0)[1].ok
            client.load("victim", 0, 2, list(range(512)), hashes)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        start = time.monotonic()
        try:
            client.query("victim", hashes[:4])
            raise AssertionError("a query to a dead server succeeded")
        except PegaTimeoutError:
            first = time.monotonic() - start
        start = time.monotonic()
        for call in (lambda: client.save("victim", 0, 3, [0], hashes[:1]),
                     lambda: client.load("victim", 0, 4, [0], hashes[:1])):
            try:
                call()
                raise AssertionError("a transfer to a dead server was accepted")
            except PegaTimeoutError:
                pass
        later = time.monotonic() - start
        client.poll_completions(0.0)  # must return, whatever arrived
        client.close()
        # A hang guard, not a speed figure: the deadline plus a loaded machine's slack.
        assert first <= timeout_s + 5.0, f"the first call after the kill took {first:.2f} s"
        assert later <= 5.0, f"calls during the back-off took {later:.2f} s"
        return {"first_error_s": round(first, 3), "backoff_errors_s": round(later, 3)}
    finally:
        server.stop(signal.SIGKILL)


def restart_server(timeout_s: float = 1.0) -> dict[str, Any]:
    """Kill the server and start a new one on the same endpoint: the same client object says
    hello again by itself; a transfer then needs a new registration (not_registered), and a
    registration makes it work again."""
    endpoint = fresh_endpoint()
    first = ServerProcess("--endpoint", endpoint, pool_size="16mb")
    second = None
    try:
        client = PegaClient(endpoint, timeout_s=timeout_s, name="restart")
        backing, regions = cpu_cache(16)
        register(client, "r", backing, regions)
        hashes = [block_hash(backing, b) for b in range(4)]
        client.save("r", 0, 1, [0, 1, 2, 3], hashes)
        assert wait_jobs(client, {1}, 10.0)[1].ok
        first.stop(signal.SIGKILL)
        second = ServerProcess("--endpoint", endpoint, pool_size="16mb")
        # The same client object: its next call finds no session, says hello again and carries
        # on; the new server knows no instance yet (unknown_instance) until the caller declares it.
        try:
            client.query("r", hashes)
        except PegaClientError:
            pass
        wait_for(lambda: _ok(lambda: client.register_instance(
            "r", model="rel", kv_dtype="int8", layout="LBNHC", block_size=16, page_bytes=[PAGE, PAGE])),
            15.0, "the client reaching the restarted server")
        try:
            client.save("r", 0, 2, [0], hashes[:1])
            raise AssertionError("a save without a registration on the new server was accepted")
        except PegaServerError as exc:
            assert exc.code == P.NOT_REGISTERED, exc
        client.register_kv_caches("r", 0, backing, regions, 16)
        client.save("r", 0, 3, [0, 1, 2, 3], hashes)
        assert wait_jobs(client, {3}, 10.0)[3].ok
        assert client.query("r", hashes) == 4
        stats = client.stats()["server"]
        client.close()
        assert stats["sessions"] == 1 and stats["registrations"] == 1
        return {"reconnected": True}
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


def _ok(fn) -> bool:
    try:
        fn()
        return True
    except PegaClientError:
        return False


_DOOMED = textwrap.dedent("""
    import os, sys, torch
    from pegaflow.client import PegaClient
    endpoint = sys.argv[1]
    client = PegaClient(endpoint, timeout_s=10.0, name="doomed")
    blocks, page = 512, 16 << 10
    backing = torch.randint(-128, 128, (2, blocks, page), dtype=torch.int8)
    client.register_instance("doomed", model="rel", kv_dtype="int8", layout="LBNHC", block_size=16,
                             page_bytes=[page, page])
    client.register_kv_caches("doomed", 0, backing, [(0, page, page), (blocks * page, page, page)], blocks)
    hashes = [os.urandom(32) for _ in range(blocks)]
    client.save("doomed", 0, 1, list(range(blocks)), hashes)
    client.load("doomed", 0, 2, list(range(blocks // 2)), [os.urandom(32)] + hashes[1:blocks // 2])
    print("accepted", flush=True)
    sys.stdin.read()
""")


def kill_client_mid_transfer(client_timeout: float = 1.0) -> dict[str, Any]:
    """SIGKILL a client right after its save and load were accepted: within the client timeout
    (plus a sweep and the copy) its registration, mapping, jobs and pins are gone."""
    server = ServerProcess(pool_size="64mb", client_timeout=client_timeout)
    try:
        with PegaClient(server.ipc, timeout_s=10.0, name="observer") as observer:
            before = observer.stats()["engine"]
            worker = subprocess.Popen([sys.executable, "-c", _DOOMED, server.ipc], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert worker.stdout.readline().strip() == "accepted"
                assert observer.stats()["server"]["registrations"] == 1
                worker.send_signal(signal.SIGKILL)
                worker.wait()
            finally:
                kill_quietly(worker)
            start = time.monotonic()
            wait_for(lambda: released(observer.stats(), sessions=1), client_timeout * 1.25 + 10.0,
                     "the killed client's registration, mapping, jobs and pins released")
            after = observer.stats()["engine"]
            assert after["pool_used"] + after["pool_free"] == before["pool_bytes"]
            return {"released_s": round(time.monotonic() - start, 2)}
    finally:
        server.stop()


def exhaust_pool(saves: int = 60, blocks_per_save: int = 32) -> dict[str, Any]:
    """Saves of fresh blocks overrun a pool of 2 MiB many times: every save completes ok,
    eviction keeps the newest blocks loadable bit for bit, the client sees no error."""
    server = ServerProcess(pool_size="2mb")
    try:
        with PegaClient(server.ipc, timeout_s=10.0, name="exhaust") as client:
            blocks, page = 2 * blocks_per_save, 8 << 10  # a block is 16 KiB: the pool holds 128
            backing, regions = cpu_cache(blocks, page)
            register(client, "x", backing, regions)
            last: list[bytes] = []
            for job in range(saves):
                ids = list(range(blocks_per_save)) if job % 2 else list(range(blocks_per_save, blocks))
                backing[:, ids] = torch.randint(-128, 128, (2, len(ids), page), dtype=torch.int8)
                last = [block_hash(backing, b) for b in ids]
                client.save("x", 0, job, ids, last)
                done = wait_jobs(client, {job}, 30.0)[job]
                assert done.ok and not done.skipped, done
                assert client.query("x", last) == blocks_per_save
            expected = backing[:, ids].clone()
            backing.copy_(torch.randint(-128, 128, backing.shape, dtype=torch.int8))
            client.load("x", 0, saves, ids, last)
            done = wait_jobs(client, {saves}, 30.0)[saves]
            assert done.ok and not done.missing, done
            assert torch.equal(backing[:, ids], expected), "the newest blocks did not survive eviction intact"
            stats = client.stats()
            eng = stats["engine"]
            assert eng["evictions"] > 0 and eng["pool_used"] + eng["pool_free"] == eng["pool_bytes"]
            assert stats["server"]["failed_saves"] == 0 and not stats["server"]["errors"], stats["server"]
            return {"saves": saves, "pool_overruns": round(saves * blocks_per_save * 2 * page / eng["pool_bytes"], 1),
                    "evictions": eng["evictions"]}
    finally:
        server.stop()


FAULTS = {
    "server SIGKILLed during saves": lambda: kill_server_during("save"),
    "server SIGKILLed during loads": lambda: kill_server_during("load"),
    "server restarted": restart_server,
    "client SIGKILLed mid-transfer": kill_client_mid_transfer,
    "pool exhausted by saves": exhaust_pool,
}


# ---- fuzz ---------------------------------------------------------------------------------------


def expected_replies(frame: bytes) -> int:
    """What the protocol promises for one frame: no reply to heartbeat and bye, one to anything else."""
    try:
        request = P.decode_request(frame)
    except P.ProtocolError:
        return 1
    return 0 if isinstance(request, (P.Heartbeat, P.Bye)) else 1


def fuzz_campaign(frames: int, hypothesis_share: float = 0.05, batch: int = 500, seed: int = 7) -> dict[str, Any]:
    """Send ``frames`` bad (and some good) frames on one connection, in batches; after each,
    read everything up to a health reply and check each frame got the replies it should."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_server_fuzz import BLOCKS, INSTANCE, frames as frame_strategy, mutated_frame
    from test_server_support import RawDealer

    from pegaflow.sharing import handle_to_wire, share_storage

    server = ServerProcess(pool_size="16mb")
    totals = {"frames": 0, "replies": 0, "expected": 0, "batches": 0}
    try:
        raw = RawDealer(server.ipc)
        raw.sock.setsockopt(__import__("zmq").RCVHWM, 0)  # keep every reply of a batch
        assert raw.hello()["ok"]
        fuzz_page = 128
        reply = raw.call(op="register_instance", id=1, instance_id=INSTANCE, model="m", kv_dtype="int8",
                         layout="LBNHC", block_size=16, page_bytes=[fuzz_page], hash_bytes=32)
        assert reply["ok"], reply
        backing = torch.randint(-128, 128, (BLOCKS, fuzz_page), dtype=torch.int8)
        storage = handle_to_wire(share_storage(backing))
        assert raw.call(op="register_kv_caches", id=2, instance_id=INSTANCE, rank=0, storage=storage,
                        regions=[[0, fuzz_page, fuzz_page]], num_blocks=BLOCKS)["ok"]

        def send(batch_frames: list[bytes]) -> None:
            for f in batch_frames:
                raw.send(f)
            raw.send({"op": "hello", "id": 900_000, "version": P.PROTOCOL_VERSION, "pid": os.getpid(), "name": "f"})
            raw.send({"op": "health", "id": 900_001})
            got = 0
            while True:
                msg = raw.recv(30.0)
                if msg.get("op") == "completion":
                    continue
                if msg.get("id") == 900_001 and msg.get("ok") and "status" in msg:
                    break
                got += 1
            got -= 1  # the hello's reply
            want = sum(expected_replies(f) for f in batch_frames)
            totals["frames"] += len(batch_frames)
            totals["replies"] += got
            totals["expected"] += want
            totals["batches"] += 1
            assert got == want, f"batch {totals['batches']}: {got} replies to frames that deserved {want}"

        structured = int(frames * hypothesis_share)
        rng = random.Random(seed)
        remaining = frames - structured
        while remaining > 0:
            n = min(batch, remaining)
            send([mutated_frame(rng, storage) for _ in range(n)])
            remaining -= n
        if structured:
            per_example = 25

            @settings(max_examples=max(1, structured // per_example), deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            @given(data=st.data())
            def drawn(data) -> None:
                send([data.draw(frame_strategy(storage)) for _ in range(per_example)])

            drawn()
        raw.close()
        assert server.alive(), "the server died under the fuzz"
        with PegaClient(server.ipc, timeout_s=10.0) as client:
            assert client.health()["status"] == "ok"
        return totals
    finally:
        server.stop()


# ---- sustained load -----------------------------------------------------------------------------


def _load_client_run(endpoint: str, index: int, requests: int, blocks: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    client = PegaClient(endpoint, timeout_s=30.0, name=f"load-{index}")
    iid = f"load-{index}"
    backing, regions = cpu_cache(blocks)
    register(client, iid, backing, regions)
    free = set(range(blocks))
    inflight: dict[int, tuple[str, list[int], list[bytes]]] = {}
    saved: list[bytes] = []  # hashes of saves that completed ok (may be evicted since)
    counts = {"query": 0, "save": 0, "load": 0, "completions": 0, "duplicates": 0, "corrupt": 0,
              "load_ok": 0, "load_missing": 0, "save_failed": 0}
    next_job = 1

    def finish(done: Any) -> None:
        job = inflight.pop(done.job_id, None)
        if job is None:
            counts["duplicates"] += 1
            return
        counts["completions"] += 1
        kind, ids, hashes = job
        if kind == "save":
            if done.ok:
                skipped = set(done.skipped)
                saved.extend(h for i, h in enumerate(hashes) if i not in skipped)
            else:
                counts["save_failed"] += 1
        else:
            missing = set(done.missing)
            counts["load_ok" if done.ok else "load_missing"] += 1
            for i, (b, h) in enumerate(zip(ids, hashes)):
                if i not in missing and block_hash(backing, b) != h:
                    counts["corrupt"] += 1
        free.update(ids)

    start = time.time()
    for _ in range(requests):
        for done in client.poll_completions(0.0):
            finish(done)
        deadline = time.monotonic() + 60.0
        while len(inflight) >= MAX_INFLIGHT or not free:
            assert time.monotonic() < deadline, "completions stopped coming"
            for done in client.poll_completions(5.0):
                finish(done)
        choice = rng.random()
        kind = "query" if choice < 0.4 else "save" if choice < 0.7 or not saved else "load"
        if kind == "query":
            known = rng.sample(saved, min(len(saved), rng.randint(0, 8)))
            client.query(iid, known + [os.urandom(32)])
            counts["query"] += 1
            continue
        k = min(len(free), rng.randint(1, 4))
        ids = rng.sample(sorted(free), k)
        job, next_job = next_job, next_job + 1
        if kind == "save":  # save fresh blocks (the cache must not change under a save in flight)
            backing[:, ids] = torch.randint(-128, 128, (2, k, PAGE), dtype=torch.int8)
            hashes = [block_hash(backing, b) for b in ids]
            client.save(iid, 0, job, ids, hashes)
            counts["save"] += 1
        else:  # load blocks saved earlier (some evicted by now: those come back missing)
            hashes = rng.sample(saved, min(k, len(saved)))
            ids = ids[:len(hashes)]
            client.load(iid, 0, job, ids, hashes)
            counts["load"] += 1
        free.difference_update(ids)
        inflight[job] = (kind, ids, hashes)
    deadline = time.monotonic() + 60.0
    while inflight and time.monotonic() < deadline:
        for done in client.poll_completions(1.0):
            finish(done)
    end = time.time()
    counts["lost"] = len(inflight)
    client.close()
    return {"index": index, "start": start, "end": end, **counts}


def sustained_load(procs: int, requests: int, blocks: int = 64, pool_size: str = "8mb") -> dict[str, Any]:
    """``procs`` processes x ``requests`` mixed calls against one server; then check that nothing
    was lost or corrupted and that the server's accounting is back where it started."""
    server = ServerProcess(pool_size=pool_size)
    try:
        with PegaClient(server.ipc, timeout_s=30.0, name="observer") as observer:
            before = observer.stats()
            workers = [subprocess.Popen([sys.executable, __file__, "--client", server.ipc, str(i), str(requests),
                                         str(blocks), str(1000 + i)], stdout=subprocess.PIPE, text=True)
                       for i in range(procs)]
            results = []
            try:
                for w in workers:
                    out, _ = w.communicate(timeout=600)
                    lines = out.strip().splitlines()
                    results.append(json.loads(lines[-1]) if lines else {"error": f"exit code {w.returncode}"})
            finally:
                for w in workers:
                    kill_quietly(w)
            errors = [r["error"] for r in results if "error" in r]
            assert not errors, errors
            wait_for(lambda: released(observer.stats(), sessions=1), 30.0, "every client's state released")
            after = observer.stats()
        assert server.alive()
    finally:
        server.stop()
    total = {k: sum(r[k] for r in results) for k in results[0] if k not in ("index", "start", "end")}
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    eng0, eng1 = before["engine"], after["engine"]
    slot_bytes = eng1["pool_used"] // max(1, eng1["entries"])
    accounting_ok = (eng1["pool_used"] + eng1["pool_free"] == eng0["pool_used"] + eng0["pool_free"] == eng0["pool_bytes"]
                     and eng1["pool_used"] == eng1["entries"] * slot_bytes and eng1["entries_pinned"] == 0
                     and eng1["entries_writing"] == 0 and eng1["loads_pinned"] == 0)
    submitted = total["save"] + total["load"]
    summary = {
        "procs": procs, "requests": procs * requests, "seconds": round(seconds, 2),
        "requests_per_s": round(procs * requests / seconds, 1), **total,
        "submitted": submitted, "pins_leaked": eng1["entries_pinned"] + eng1["loads_pinned"],
        "jobs_leaked": after["server"]["inflight_jobs"], "registrations_left": after["server"]["registrations"],
        "mappings_left": after["server"]["open_mappings"], "evictions": eng1["evictions"],
        "accounting_ok": accounting_ok,
    }
    assert total["query"] + submitted == procs * requests, summary
    assert total["lost"] == 0 and total["duplicates"] == 0 and total["completions"] == submitted, summary
    assert total["corrupt"] == 0, summary
    assert summary["pins_leaked"] == summary["jobs_leaked"] == summary["registrations_left"] == 0, summary
    assert summary["mappings_left"] == 0 and accounting_ok, (summary, eng1)
    return summary


# ---- the report ---------------------------------------------------------------------------------


def client_main(argv: list[str]) -> None:
    """``--client ENDPOINT INDEX REQUESTS BLOCKS SEED``: one load client; prints its counts as JSON."""
    endpoint, index, requests, blocks, seed = argv[0], *map(int, argv[1:5])
    try:
        result = _load_client_run(endpoint, index, requests, blocks, seed)
    except Exception as exc:  # reported to the parent, which fails the run
        result = {"index": index, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2:])
        return
    parser = arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="mixed requests per client process")
    parser.add_argument("--frames", type=int, default=100_000, help="fuzz frames")
    args = parser.parse_args()
    rows: list[Row] = []
    extra: dict[str, Any] = {"faults": {}}

    survived = 0
    for name, scenario in FAULTS.items():
        start = time.monotonic()
        result = scenario()
        survived += 1
        extra["faults"][name] = result
        print(f"fault: {name}: survived ({time.monotonic() - start:.1f} s) {result}", flush=True)
    rows.append(Row("cpu-server", "faults", "scenarios survived", True, survived, "count", ceiling=len(FAULTS)))

    start = time.monotonic()
    fuzz = fuzz_campaign(args.frames)
    fuzz_s = time.monotonic() - start
    print(f"fuzz: {fuzz} in {fuzz_s:.1f} s", flush=True)
    extra["fuzz"] = {**fuzz, "seconds": round(fuzz_s, 1)}
    rows += [
        Row("cpu-server", "fuzz", "inputs tried", True, fuzz["frames"], "frames"),
        Row("cpu-server", "fuzz", "inputs answered as promised", True, fuzz["replies"], "replies",
            ceiling=fuzz["expected"], note="a reply per frame, none for heartbeat/bye; the server alive after"),
        Row("cpu-server", "fuzz", "inputs per second", True, round(fuzz["frames"] / fuzz_s, 1), "frames/s"),
    ]

    load = sustained_load(args.procs, args.requests)
    print(f"sustained load: {load}", flush=True)
    extra["sustained_load"] = load
    config = f"{args.procs}x{args.requests}"
    rows += [
        Row(config, "load", "requests held", True, load["requests_per_s"], "req/s",
            note="query/save/load mix on the CPU reference copies, 2-core dev machine"),
        Row(config, "load", "completions lost", True, load["lost"], "count"),
        Row(config, "load", "blocks loaded corrupt", True, load["corrupt"], "count"),
        Row(config, "load", "pins leaked", True, load["pins_leaked"], "count"),
        Row(config, "load", "jobs/registrations/mappings left", True,
            load["jobs_leaked"] + load["registrations_left"] + load["mappings_left"], "count"),
        Row(config, "load", "pool accounting back to start", True, int(load["accounting_ok"]), "bool"),
    ]
    print_table(rows)
    write_json(args.json, "reliability", rows, extra)


if __name__ == "__main__":
    main()
