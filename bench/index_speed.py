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

Every row is measured twice, taking turns in the same run: with the index's numba-compiled
hash sets (the default when numba imports) and with its dicts alone (``[dicts]``), so the
sets' gain on queries and their cost on saves (keeping the mirror) show side by side.

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


STEPS = ("prepare_save", "complete_save", "prepare_load", "unpin")


def bookkeeping(index: BlockIndex, namespace: str, rounds: int, steps: dict[str, list[float]],
                blocks: int = 512) -> None:
    """Seconds of each step of a save then a load of ``blocks`` fresh hashes (plans' offsets
    included, as the engine asks for them), appended to ``steps``."""
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
        for name, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[name].append(dt)


def medians(steps: dict[str, list[float]]) -> dict[str, float]:
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
    ns = spec.namespace
    blob = b"".join(query)
    other_blob = b"".join(keys[step // 2::step][:QUERY])  # none of query's hits: logged apart
    plain = {(ns, k): k for k in keys}

    def ceiling() -> None:
        get = plain.get
        for k in query:
            if get((ns, k)) is None:
                break

    fns: dict = {"ceiling": ceiling}
    engines = {}
    for variant, compiled in (("", True), (" [dicts]", False)):
        engine = Engine(EngineConfig(pool_bytes=args.entries * SLOT, compiled_index=compiled))
        engine.register_instance(spec)
        populate(engine.index, ns, keys)
        assert engine.query("bench", query) == QUERY
        if compiled and not engine.index.compiled:
            raise SystemExit("numba is not importable here: nothing to compare the dicts with")
        engines[variant] = engine
        index = engine.index
        blobs = [blob, other_blob]

        def blob_and_apply(index=index) -> None:
            index.query_blob(ns, blob, 32)
            index.apply_touches()

        fns.update({
            "blob" + variant: blob_and_apply,
            "blob_reply" + variant: lambda index=index: index.query_blob(ns, blob, 32),
            "blob_reply_two" + variant: lambda index=index, blobs=blobs: index.query_blob(
                ns, blobs.reverse() or blobs[0], 32),
            "index" + variant: lambda index=index: (index.query(ns, query), index.apply_touches()),
            "engine" + variant: lambda engine=engine: (engine.query("bench", query), engine.index.apply_touches()),
        })
    measured = rates(fns, QUERY, args.seconds * len(engines))
    # The pool is full: every save evicts 512 entries, as in a long-running server. The two
    # indexes take turns, a tenth of the rounds at a time.
    steps = {variant: {name: [] for name in STEPS} for variant in engines}
    for engine in engines.values():
        engine.index.apply_touches()
    for _ in range(10):
        for variant, engine in engines.items():
            bookkeeping(engine.index, ns, max(1, args.book_rounds // 10), steps[variant])
    for engine in engines.values():
        engine.close()

    config = f"{QUERY}-of-{args.entries}"
    book_config = f"512-fresh-in-{args.entries}"
    ceiling_rate = measured["ceiling"]
    rows = []
    for variant in engines:
        m = {name: measured[name + variant] / 1e6 for name in ("blob", "blob_reply", "blob_reply_two", "index",
                                                                 "engine")}
        rows += [
            Row(config, "query", "index.query_blob (+LRU touches applied)" + variant, True, m["blob"], "Mhash/s",
                ceiling_rate / 1e6),
            Row(config, "query", "index.query_blob (touches logged; the same query again replaces them)" + variant,
                True, m["blob_reply"], "Mhash/s", ceiling_rate / 1e6),
            Row(config, "query", "index.query_blob, two queries in turn (touches applied at the 64k bound)"
                + variant, True, m["blob_reply_two"], "Mhash/s", ceiling_rate / 1e6),
            Row(config, "query", "index.query (+LRU)" + variant, True, m["index"], "Mhash/s", ceiling_rate / 1e6),
            Row(config, "query", "engine.query (+checks, LRU)" + variant, True, m["engine"], "Mhash/s",
                ceiling_rate / 1e6),
        ]
        books = medians(steps[variant])
        for name, value in books.items():
            rows.append(Row(book_config, "bookkeeping", f"{name} median us (no ratio){variant}", True,
                            round(value, 1), "us"))
        print(f"target >= 1 Mhash/s{variant or ' [compiled]'}: query_blob {m['blob']:.2f}, index {m['index']:.2f}, "
              f"engine {m['engine']:.2f}; save+load bookkeeping of 512 blocks {books['total']:.0f} us")
    rows.append(Row(config, "query", "dict.get loop (ceiling)", False, ceiling_rate / 1e6, "Mhash/s",
                    ceiling_rate / 1e6))
    print_table(rows)
    write_json(args.json, "index_speed", rows, {"card": cpu_name()})


if __name__ == "__main__":
    main()
