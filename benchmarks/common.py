"""Timing helpers shared by the benchmarks: best-of-N wall time, a ratio table, and a training run."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def train(out: Path, steps: int, *overrides: str) -> None:
    """``python run.py`` training ``steps`` steps into ``out`` (no tracker, no checkpoints, no bar);
    step times are in its ``metrics.jsonl``, its output in ``<out>.log`` (shown when it fails)."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        str(root / "run.py"),
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.save_strategy=no",
        "trainer.disable_tqdm=true",
        *overrides,
        f"hydra.run.dir={out}",
    ]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        status = subprocess.run(command, cwd=root, stdout=sink, stderr=subprocess.STDOUT).returncode
    if status:
        raise RuntimeError(f"{' '.join(command)} failed ({status}):\n{log.read_text()[-3000:]}")
