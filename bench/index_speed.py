"""Index speed on the CPU: a query of 1,000 hashes (all hits, each one an LRU update), and the
bookkeeping of one 512-block save and load.

Query rows: the index's query of the wire form (``query_blob``: split, look up, log the LRU
touches) with its touches applied in the same call, the same without them (what a server's
reply waits for: it applies them once idle) for the same query again (its log entry replaces
the previous one's) and for two queries in turn (logged apart: applied at the 64k bound),
``query`` of a list, the engine's query
(adds the hash checks), and the practical ceiling measured in the same run: a bare
``dict.get`` loop over the same (already hashed) keys, no LRU. Target: >= 1M hashes/s
(issue 3). Bookkeeping rows: ``prepare_save`` + ``complete_save`` + ``prepare_load`` +
``unpin`` of 512 fresh hashes in the same index, median us per step and in all.

    python bench/index_speed.py --json bench/results/index_speed-cpu.json
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time

from common import Row, arg_parser, print_table, write_json

from pegaflow.engine import Engine, EngineConfig, InstanceSpec
from pegaflow.engine.index import BlockIndex

QUERY = 1000
SLOT = 256


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rates(fns: dict, hashes_per_call: int, seconds: float, rounds: int = 10) -> dict[str, float]:
    """Hashes per second of each fn, best of ``rounds``; the methods take turns in every
    round, so a busy shared machine slows them alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / rounds:
                for _ in range(10):
                    fn()
                calls += 10
            best[name] = max(best[name], calls * hashes_per_call / elapsed)
    return best


def populate(index: BlockIndex, namespace: str, keys: list[bytes]) -> None:
    for start in range(0, len(keys), 4096):
        plan = index.prepare_save(namespace, keys[start : start + 4096], 0, 1, SLOT)
        index.complete_save(plan, True)


def bookkeeping(index: BlockIndex, namespace: str, rounds: int, blocks: int = 512) -> dict[str, float]:
    """Median us of each step of a save then a load of ``blocks`` fresh hashes (plans' offsets
    included, as the engine asks for them)."""
    steps: dict[str, list[float]] = {"prepare_save": [], "complete_save": [], "prepare_load": [], "unpin": []}
    for _ in range(rounds):
        hashes = [os.urandom(32) for _ in range(blocks)]
        t0 = time.perf_counter()
        plan = index.prepare_save(namespace, hashes, 0, 1, SLOT)
        plan.offsets()
        t1 = time.perf_counter()
        index.complete_save(plan, True)
        t2 = time.perf_counter()
        load = index.prepare_load(namespace, hashes, 0)
        load.offsets()
        t3 = time.perf_counter()
        index.unpin(load)
        t4 = time.perf_counter()
        for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[name].append(dt)
    out = {name: statistics.median(v) * 1e6 for name, v in steps.items()}
    out["total"] = statistics.median(sum(v) for v in zip(*steps.values())) * 1e6
    return out


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000, help="READY entries in the index")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measured method")
    parser.add_argument("--book-rounds", type=int, default=200, help="512-block save+load rounds")
    args = parser.parse_args()

    keys = [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(args.entries)]
    step = max(1, args.entries // QUERY)
    query = keys[::step][:QUERY]  # spread over the LRU order, so every hit moves an entry

    spec = InstanceSpec("bench", "m", "bf16", "LBNHC", 16, (SLOT,))
    engine = Engine(EngineConfig(pool_bytes=args.entries * SLOT))
    engine.register_instance(spec)
    populate(engine.index, spec.namespace, keys)
    assert engine.query("bench", query) == QUERY

    plain = {(spec.namespace, k): k for k in keys}
    ns = spec.namespace
    blob = b"".join(query)
    other_blob = b"".join(keys[step // 2::step][:QUERY])  # none of query's hits: logged apart
    blobs = [blob, other_blob]
    index = engine.index

    def blob_and_apply() -> None:
        index.query_blob(ns, blob, 32)
        index.apply_touches()

    def ceiling() -> None:
        get = plain.get
        for k in query:
            if get((ns, k)) is None:
                break

    measured = rates(
        {
            "ceiling": ceiling,
            "blob": blob_and_apply,
            "blob_reply": lambda: index.query_blob(ns, blob, 32),
            "blob_reply_two": lambda: index.query_blob(ns, blobs.reverse() or blobs[0], 32),
            "index": lambda: (engine.index.query(ns, query), index.apply_touches()),
            "engine": lambda: (engine.query("bench", query), index.apply_touches()),
        },
        QUERY,
        args.seconds,
    )
    ceiling_rate, index_rate, engine_rate = measured["ceiling"], measured["index"], measured["engine"]
    blob_rate, reply_rate, two_rate = measured["blob"], measured["blob_reply"], measured["blob_reply_two"]
    index.apply_touches()
    # The pool is full: every save evicts 512 entries, as in a long-running server.
    books = bookkeeping(index, ns, args.book_rounds)
    engine.close()

    config = f"{QUERY}-of-{args.entries}"
    rows = [
        Row(config, "query", "index.query_blob (+LRU touches applied)", True, blob_rate / 1e6, "Mhash/s",
            ceiling_rate / 1e6),
        Row(config, "query", "index.query_blob (touches logged; the same query again replaces them)", True,
            reply_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "index.query_blob, two queries in turn (touches applied at the 64k bound)", True,
            two_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "index.query (+LRU)", True, index_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "engine.query (+checks, LRU)", True, engine_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "dict.get loop (ceiling)", False, ceiling_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
    ]
    book_config = f"512-fresh-in-{args.entries}"
    for name, value in books.items():
        rows.append(Row(book_config, "bookkeeping", f"{name} median us (no ratio)", True, round(value, 1), "us"))
    print_table(rows)
    print(f"target >= 1 Mhash/s: query_blob {blob_rate / 1e6:.2f}, index {index_rate / 1e6:.2f}, "
          f"engine {engine_rate / 1e6:.2f}; save+load bookkeeping of 512 blocks {books['total']:.0f} us")
    write_json(args.json, "index_speed", rows, {"card": cpu_name()})


if __name__ == "__main__":
    main()
