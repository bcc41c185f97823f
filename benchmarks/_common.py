"""Timing helpers shared by the benchmarks: medians of repeats, a table with ratios."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable


def cache_dir(name: str) -> str:
    """Where a benchmark keeps the data it generated (reused across runs)."""
    root = os.environ.get("TANDEM_BENCH_DIR") or os.path.join(os.getcwd(), ".cache", "bench")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def rate(fn: Callable[[], int | tuple[int, float]], repeats: int) -> float:
    """Median samples/s of ``fn``: it returns how many samples it handled, or
    ``(samples, seconds)`` when it times itself (e.g. from its first batch on)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        n, secs = out if isinstance(out, tuple) else (out, time.perf_counter() - t)
        rates.append(n / secs)
    return statistics.median(rates)


def compare(ours: Callable, anchor: Callable, repeats: int) -> tuple[float, float, float]:
    """Rates of two contenders measured in alternation (ours, anchor, ours, ...), so that a
    noisy neighbour slows both alike: median rates, and the median of the paired ratios."""
    pairs = [(rate(ours, 1), rate(anchor, 1)) for _ in range(repeats)]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))


class Table:
    """Rows of (what, samples/s, anchor, ratio, target), printed as markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[dict] = []

    def add(self, name: str, ours: float, anchor_name: str, anchor: float, target: float,
            ratio: float | None = None) -> None:
        ratio = ours / anchor if ratio is None else ratio
        self.rows.append({"case": name, "ours": ours, "anchor": anchor_name, "anchor_rate": anchor,
                          "ratio": ratio, "target": target, "met": ratio >= target})
        print(f"  {name}: {ours:,.0f}/s vs {anchor_name} {anchor:,.0f}/s = {ratio:.2f}x (target >= {target}x)",
              flush=True)

    def add_compared(self, name: str, ours: Callable, anchor_name: str, anchor: Callable, target: float,
                     repeats: int) -> None:
        """Measure both with :func:`compare` and add the row."""
        o, a, r = compare(ours, anchor, repeats)
        self.add(name, o, anchor_name, a, target, ratio=r)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| case | Tandem samples/s | anchor | anchor samples/s | ratio | target |",
                 "|---|---:|---|---:|---:|---:|"]
        for r in self.rows:
            mark = "" if r["met"] else " (missed)"
            lines.append(f"| {r['case']} | {r['ours']:,.0f} | {r['anchor']} | {r['anchor_rate']:,.0f} | "
                         f"{r['ratio']:.2f}x{mark} | >= {r['target']}x |")
        return "\n".join(lines)

    def save(self, path: str | None) -> None:
        print()
        print(self.markdown())
        if path:
            with open(path, "w") as f:
                json.dump(self.rows, f, indent=1)
