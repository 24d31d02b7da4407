"""Draw the end-to-end figures (``bench/e2e.py --json``) against their ceilings and the
per-block-copy baseline of ``bench/gather_scatter.py`` (the newest ``gather_scatter-*.json``
beside the input, or ``--baseline``).

    python3 bench/plot_e2e.py bench/results/e2e-h100.json            # writes e2e-h100.png
    pip install -e '.[plot]'                                          # matplotlib
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {"save": 0.90, "load": 0.90, "both": 0.85}


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data, data["rows"]


def find_baseline(path: Path, explicit: Path | None, config: str) -> dict[str, float]:
    """Per-block-copy GB/s by direction for ``config`` (the first matching gather_scatter file)."""
    candidates = [explicit] if explicit else sorted(path.parent.glob("gather_scatter-*.json"))
    for candidate in candidates:
        if candidate is None or not candidate.exists():
            continue
        rows = json.loads(candidate.read_text())["rows"]
        found = {r["direction"]: r["value"] for r in rows
                 if r["method"] == "per-block-copy" and r["config"] == config.split("-tp")[0]}
        if found:
            return found
    return {}


def pick(rows: list[dict], direction: str, method: str) -> dict | None:
    return next((r for r in rows if r["direction"] == direction and r["method"] == method), None)


def plot(path: Path, out: Path, baseline_path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, rows = load_rows(path)
    config = next((r["config"] for r in rows), "?")
    baseline = find_baseline(path, baseline_path, config)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"PegaFlow end to end, {config}: {data['card']}, {data['date']}")

    ax = axes[0][0]  # bandwidth against the ceilings
    labels, ours, ceil, base = [], [], [], []
    for d in ("save", "load", "both"):
        r = pick(rows, d, "pegaflow-e2e")
        if r is None:
            continue
        labels.append(d)
        ours.append(r["value"])
        ceil.append(r.get("ceiling") or 0)
        base.append(baseline.get(d, 0))
    for d in ("save", "load"):
        r = pick(rows, "interference", f"{d}-gbps-meanwhile")
        if r is not None:
            labels.append(f"{d} during\nmatmuls")
            ours.append(r["value"])
            ceil.append(r.get("ceiling") or 0)
            base.append(0)
    x = range(len(labels))
    ax.bar([i - 0.27 for i in x], ceil, 0.27, label="ceiling (contiguous pinned copy, same run)", color="#bbbbbb")
    ax.bar(x, ours, 0.27, label="PegaFlow, whole stack", color="#1f77b4")
    if any(base):
        ax.bar([i + 0.27 for i in x], base, 0.27, label="per-block copy_ loop (gather_scatter)", color="#d62728")
    for i, (v, c) in enumerate(zip(ours, ceil)):
        if c:
            ax.annotate(f"{v / c:.2f}", (i, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GB/s")
    ax.set_title("transfers (ratio to ceiling on the bars; targets 0.90 / 0.85)")
    ax.legend(fontsize=8)

    ax = axes[0][1]  # time to first token, modelled
    ttft = [r for r in rows if r["direction"] == "ttft" and r["method"].startswith("speedup-")]
    if ttft:
        names = [r["method"].removeprefix("speedup-") for r in ttft]
        x = range(len(ttft))
        ax.bar([i - 0.2 for i in x], [r["ceiling"] for r in ttft], 0.4, label="PCIe bound: prefill / contiguous copy",
               color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], [r["value"] for r in ttft], 0.4, label="PegaFlow: prefill / load", color="#1f77b4")
        for i, r in enumerate(ttft):
            ax.annotate(f"{r['value']:.1f}x ({r['ratio']:.2f})", (i + 0.2, r["value"]), ha="center", va="bottom",
                        fontsize=9)
        ax.set_xticks(list(x), names)
        ax.set_ylabel("speedup over prefill (x)")
        ax.legend(fontsize=8)
    ax.set_title("time to first token, modelled (target 0.9 of the bound)")

    ax = axes[1][0]  # control overhead
    over = [r for r in rows if r["direction"] == "overhead"]
    if over:
        ax.bar(range(len(over)), [r["value"] for r in over], color=["#1f77b4" if "p50" in r["method"] else "#aec7e8"
                                                                  for r in over])
        ax.axhline(200, color="#d62728", linestyle="--", label="target p50 200 us")
        ax.set_xticks(range(len(over)), [r["method"] for r in over], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("us beyond the copy time")
        ax.legend(fontsize=8)
    ax.set_title("control overhead per request (latency minus copy)")

    ax = axes[1][1]  # interference
    rounds = data.get("details", {})
    series = []
    for d in ("save", "load"):
        per_rank = rounds.get(f"interference_{d}")
        if per_rank:
            series.append((d, [x for rank in per_rank for x in rank["ratios"]]))
    if series:
        ax.boxplot([s for _, s in series])
        ax.set_xticks(range(1, len(series) + 1), [f"with {d}s" for d, _ in series])
        for i, (_, s) in enumerate(series, start=1):
            ax.scatter([i] * len(s), s, s=10, color="#1f77b4", zorder=3)
        ax.axhline(0.95, color="#d62728", linestyle="--", label="target 0.95")
        ax.axhline(1.0, color="#999999", linewidth=0.8)
        ax.set_ylabel("matmul rate / rate alone (adjacent rounds)")
        ax.legend(fontsize=8)
    ax.set_title("interference with a bf16 matmul loop in the worker")

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, help="bench/e2e.py --json output")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the JSON's name with .png)")
    parser.add_argument("--baseline", type=Path, help="a gather_scatter JSON with the per-block-copy rows")
    args = parser.parse_args()
    out = plot(args.json, args.out or args.json.with_suffix(".png"), args.baseline)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
