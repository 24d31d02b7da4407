"""Shared runner for the benchmarks: timing, the result rows, the table and the JSON file.

Every benchmark writes the format of ``shared/bench-results.md``: one object with the card,
the date, the command and one row per measured figure, each beside its ceiling measured in
the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    config: str
    direction: str
    method: str
    ours: bool
    value: float
    unit: str
    ceiling: float | None = None
    ratio: float | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.ceiling and self.ratio is None:
            self.ratio = round(self.value / self.ceiling, 3)


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu (no GPU: nothing measured on a GPU)"


def versions() -> dict[str, str]:
    import pegaflow

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "pegaflow": pegaflow.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, help="write the results here (shared/bench-results.md format)")
    return parser


def cuda_time_ms(fn: Callable[[], None], *, warmup: int = 5, repeat: int = 20) -> float:
    """Median milliseconds of ``fn`` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def print_table(rows: list[Row]) -> None:
    header = f"{'config':<18} {'dir':<12} {'method':<28} {'value':>10} {'unit':<6} {'ceiling':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ceiling = f"{r.ceiling:9.2f}" if r.ceiling else " " * 9
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else " " * 6
        mark = "*" if r.ours else " "
        print(f"{r.config:<18} {r.direction:<12} {mark}{r.method:<27} {r.value:10.3f} {r.unit:<6} {ceiling} {ratio}")
    print("(* = PegaFlow's own method)")


def write_json(path: Path | None, bench: str, rows: list[Row], extra: dict | None = None) -> None:
    if path is None:
        return
    payload = {
        "bench": bench,
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": versions(),
        "rows": [{k: v for k, v in asdict(r).items() if v is not None} for r in rows],
    }
    if extra:
        payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
