"""Timing helpers shared by the benchmarks: best-of-N wall time and a ratio table."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn`` in seconds (after one untimed warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def report(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """Print rows of (comparison, variant A, variant B, ratio) as a table."""
    table = Table(title=title)
    for column in ("comparison", "A", "B", "ratio"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
