"""Index speed on the CPU: a query of 1,000 hashes (all hits, each one an LRU update).

Rows: the index's own query, the engine's query (adds the hash checks the server relies on),
and the practical ceiling measured in the same run: a bare ``dict.get`` loop over the same
keys, no LRU. Target: >= 1M hashes/s (issue 3).

    python bench/index_speed.py --json bench/results/index_speed-cpu.json
"""

from __future__ import annotations

import hashlib
import platform
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


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000, help="READY entries in the index")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measured method")
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

    def ceiling() -> None:
        get = plain.get
        for k in query:
            if get((ns, k)) is None:
                break

    measured = rates(
        {
            "ceiling": ceiling,
            "index": lambda: engine.index.query(ns, query),
            "engine": lambda: engine.query("bench", query),
        },
        QUERY,
        args.seconds,
    )
    ceiling_rate, index_rate, engine_rate = measured["ceiling"], measured["index"], measured["engine"]
    engine.close()

    config = f"{QUERY}-of-{args.entries}"
    rows = [
        Row(config, "query", "index.query (+LRU)", True, index_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "engine.query (+checks, LRU)", True, engine_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
        Row(config, "query", "dict.get loop (ceiling)", False, ceiling_rate / 1e6, "Mhash/s", ceiling_rate / 1e6),
    ]
    print_table(rows)
    print(f"target >= 1 Mhash/s: index {index_rate / 1e6:.2f}, engine {engine_rate / 1e6:.2f}")
    write_json(args.json, "index_speed", rows, {"card": cpu_name()})


if __name__ == "__main__":
    main()
