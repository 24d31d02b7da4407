"""Rows (``shared/bench-results.md``) and the target check of the end-to-end run.

Per-rank results are combined as one instance sees them: rates add up over ranks (bytes of
every rank over the span from the first submit to the last completion of any rank), ceilings
add up (each rank's the higher of its measurements before and after the bulk phases),
latencies pool every rank's samples, times take the slowest rank.
"""

from __future__ import annotations

import statistics
from typing import Any

from common import Row

TARGETS = {"save": 0.90, "load": 0.90, "both": 0.85, "overhead_us": 200.0, "interference": 0.95, "ttft": 0.90}


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bulk_rates(per_rank: list[dict[str, Any]], directions: tuple[str, ...]) -> list[float]:
    """GB/s of each round, every rank and the given directions together."""
    out = []
    for r in range(len(per_rank[0]["rounds"])):
        parts = [rank["rounds"][r][d] for rank in per_rank for d in directions if d in rank["rounds"][r]]
        if not parts:
            continue
        span = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        out.append(sum(p["bytes"] for p in parts) / span / 1e9 if span > 0 else 0.0)
    return out


def build_rows(results: dict[str, Any], shape: str, layout: str, tp: int, block_bytes: int) -> list[Row]:
    config = shape + ("" if layout == "LBNHC" else f"-{layout.lower()}") + (f"-tp{tp}" if tp > 1 else "")
    rows: list[Row] = []
    replay = results.get("replay")
    if replay:
        s = replay["stats"]
        rows.append(Row(config, "correctness", "loads-checked-bit-exact", True, s.get("blocks_checked", 0), "blocks",
                        note=f"{s.get('loads_ok', 0)} loads ok, {s.get('loads_failed', 0)} failed (recomputed), "
                        f"{s['mismatches']} mismatches, {s.get('blocks_rechecked', 0)} blocks rechecked at the end"))
    runs = [c for c in (results.get("ceilings"), results.get("ceilings_late")) if c]
    if not runs:
        return rows
    # GB/s of every measurement (before and after the bulk phases), by run then rank; the
    # ceiling sums each rank's higher one.
    gbps = {d: [[_gbps(c["bytes"] * (2 if d == "both" else 1), c[f"{d}_ms"]) for c in run] for run in runs]
            for d in ("save", "load", "both")}
    ceil = {d: sum(map(max, zip(*by_run))) for d, by_run in gbps.items()}
    for d, key, dirs, name in (("save", "bulk_save", ("save",), "ceiling-contiguous-copy"),
                               ("load", "bulk_load", ("load",), "ceiling-contiguous-copy"),
                               ("both", "bulk_both", ("save", "load"), "ceiling-two-streams")):
        rows.append(Row(config, d, name, False, round(ceil[d], 3), "GB/s",
                        note="highest per rank of " + ", ".join(f"{sum(run):.1f}" for run in gbps[d])))
        if key in results:
            rates = bulk_rates(results[key], dirs)
            rows.append(_vs(config, d, "pegaflow-e2e", statistics.median(rates), "GB/s", ceil[d],
                            note="rounds: " + ", ".join(f"{x:.2f}" for x in rates)))
    for direction in ("save", "load"):
        res = results.get(f"interference_{direction}")
        if not res:
            continue
        ratios = [x for rank in res for x in rank["ratios"]]
        gbps = [sum(vals) for vals in zip(*(rank["gbps"] for rank in res))]
        alone = [x for rank in res for x in rank["alone"]]
        rows.append(Row(config, "interference", f"matmul-rate-with-{direction}s", True,
                        round(statistics.median(ratios), 3), "x alone",
                        note=f"median of {len(ratios)} interleaved rounds, spread {min(ratios):.3f}-{max(ratios):.3f}; "
                        f"matmul alone {min(alone):.0f}-{max(alone):.0f} TFLOP/s"))
        rows.append(_vs(config, "interference", f"{direction}-gbps-meanwhile", statistics.median(gbps), "GB/s",
                        ceil[direction]))
    for k, per_size in _by_size(results.get("overhead")):
        for d in ("save", "load"):
            lat = [x for rank in per_size for x in rank[d]]
            copy = statistics.mean(rank["copy_ms"][d] for rank in per_size)
            over = [(x - copy) * 1e3 for x in lat]
            note = f"latency p50 {_pct(lat, 0.5):.3f} ms minus copy {copy:.3f} ms; target p50 <= 200 us"
            calls = [x for rank in per_size for x in rank.get(f"{d}_call", [])]
            if calls:  # results of older runs lack it
                note += f"; the submitting call (request and reply) p50 {_pct(calls, 0.5) * 1e3:.0f} us"
            rows.append(Row(config, "overhead", f"{d}-{k}blk-p50", True, round(_pct(over, 0.5), 1), "us", note=note))
            rows.append(Row(config, "overhead", f"{d}-{k}blk-p99", True, round(_pct(over, 0.99), 1), "us"))
    rows += _ttft_rows(config, results)
    return rows


def _vs(config: str, direction: str, method: str, value: float, unit: str, ceiling: float,
        note: str | None = None) -> Row:
    """A row of ours beside its ceiling; the ratio from the unrounded numbers."""
    return Row(config, direction, method, True, round(value, 3), unit, ceiling=round(ceiling, 3),
               ratio=round(value / ceiling, 3) if ceiling else None, note=note)


def _by_size(overhead: list[dict] | None) -> list[tuple[int, list[dict]]]:
    if not overhead:
        return []
    return [(k, [rank[k] for rank in overhead]) for k in overhead[0]]


def _ttft_rows(config: str, results: dict[str, Any]) -> list[Row]:
    ttft, prefill = results.get("ttft"), results.get("prefill")
    if not ttft or not prefill or any(p.get("error") or not p.get("ms") for p in prefill):
        return []
    rows = []
    for tokens in ttft[0]:
        pre = max(p["ms"][tokens] for p in prefill)
        load = max(statistics.median(rank[tokens]["load_ms"]) for rank in ttft)
        copy = max(rank[tokens]["copy_ms"] for rank in ttft)
        shard = prefill[0].get("shard", "full")
        rows.append(Row(config, "ttft", f"prefill-{tokens}tok", False, round(pre, 2), "ms",
                        note=f"transformers LlamaModel, {prefill[0].get('layers')} layers, random bf16 weights, sdpa"
                        + ("" if shard == "full" else f" ({shard} shard, all-reduce not modelled)")))
        rows.append(Row(config, "ttft", f"contiguous-copy-{tokens}tok", False, round(copy, 3), "ms"))
        rows.append(Row(config, "ttft", f"pegaflow-load-{tokens}tok", True, round(load, 3), "ms",
                        note=f"{ttft[0][tokens]['blocks']} blocks through the whole stack, median"))
        rows.append(_vs(config, "ttft", f"speedup-{tokens}tok", pre / load, "x", pre / copy,
                        note="prefill/load; ceiling = prefill/contiguous copy (the PCIe bound)"))
    return rows


def summarize(results: dict[str, Any], rows: list[Row]) -> list[str]:
    """One line per target: PASS / MISS, and FAIL for anything wrong (a mismatch, a failure)."""
    lines = []

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    replay = results.get("replay")
    if replay:
        s = replay["stats"]
        ok = s["mismatches"] == 0 and s.get("loads_ok", 0) > 0 and s["drained"] and not s.get("saves_failed")
        lines.append(f"{'PASS' if ok else 'FAIL'} replay: {s.get('requests', 0)} requests, {s.get('loads_ok', 0)} loads "
                     f"({s.get('blocks_checked', 0)} blocks) bit-exact, {s['mismatches']} mismatches, "
                     f"{s.get('saves_failed', 0)} failed saves, drained={s['drained']}")
        lines += [f"  {m}" for m in replay["mismatches"]]
    for rank, pre in enumerate(results.get("prefill") or []):
        if pre.get("error"):
            lines.append(f"FAIL ttft prefill on rank {rank}: {pre['error']}")
    bad = _figure_problems(results)
    lines.append(("FAIL figure phases: " + "; ".join(bad[:5])) if bad else "PASS figure phases: every load bit-exact")
    for r in rows:
        if r.method == "pegaflow-e2e" and r.ratio is not None:
            lines.append(f"{mark(r.ratio >= TARGETS[r.direction])} {r.direction}: {r.value:.1f} GB/s = {r.ratio:.3f} of "
                         f"{r.ceiling:.1f} (>= {TARGETS[r.direction]})")
        elif r.direction == "overhead" and r.method.endswith("p50"):
            lines.append(f"{mark(r.value <= TARGETS['overhead_us'])} overhead {r.method}: {r.value:.0f} us (<= 200)")
        elif r.direction == "interference" and r.method.startswith("matmul"):
            lines.append(f"{mark(r.value >= TARGETS['interference'])} {r.method}: {r.value:.3f} ({r.note})")
        elif r.direction == "ttft" and r.method.startswith("speedup"):
            lines.append(f"{mark(r.ratio >= TARGETS['ttft'])} ttft {r.method}: {r.value:.1f}x of a {r.ceiling:.1f}x "
                         f"bound = {r.ratio:.3f} (>= 0.9)")
    return lines


def _figure_problems(results: dict[str, Any]) -> list[str]:
    out = []
    for key, per_rank in results.items():
        if not isinstance(per_rank, list) or not per_rank or not isinstance(per_rank[0], dict):
            continue
        for rank, res in enumerate(per_rank):
            for item in [res] + [v for v in res.values() if isinstance(v, dict)]:
                out += [f"{key} rank {rank}: {m}" for m in item.get("mismatches", [])]
                if item.get("failed") or item.get("ok") is False:
                    out.append(f"{key} rank {rank}: {item.get('failed')} failed transfer(s)")
            for rnd in res.get("rounds", []):
                for d, t in rnd.items():
                    if t["failed"] or t["skipped"]:
                        out.append(f"{key} rank {rank} {d}: {t['failed']} failed, {t['skipped']} blocks skipped")
    return out
