"""The default task: score a JSONL of completions with the configured reward mix.

Writes to the run dir ``scores.jsonl`` (one row per sample: every component and the total),
``summary.json`` (means per component, per ``kind`` when rows have one, and the components'
failure counters), and prints the same as a table.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table

from core.rewards.base import RewardSample
from core.tasks import job_overrides
from core.training.tracking import open_tracker

log = logging.getLogger(__name__)


def load_rows(path: str | None, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file (``None``: the bundled sample)."""
    source = Path(path) if path else files("core").joinpath("data/sample_qa.jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Means of every score column, overall and per ``kind``."""
    summary = {"n": len(rows), "mean": {k: _mean([r[k] for r in rows]) for k in names}}
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind"):
            by_kind[r["kind"]].append(r)
    if by_kind:
        summary["by_kind"] = {kind: {k: _mean([r[k] for r in rs]) for k in names} for kind, rs in by_kind.items()}
    return summary


def _table(title: str, first: str, rows: list[tuple[str, dict]], names: list[str]) -> Table:
    table = Table(title=title)
    table.add_column(first)
    for name in names:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *(f"{values[n]:.3f}" for n in names))
    return table


def run(cfg) -> dict:
    """Entry point of ``python run.py eval=rewards``."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(cfg.evaluation.path, cfg.evaluation.limit)
    samples = [
        RewardSample(
            r["completion"],
            r.get("ground_truth"),
            r.get("prompt", ""),
            dict(r.get("extra_info") or {}),
            r.get("data_source", ""),
        )
        for r in rows
    ]
    mix = instantiate(cfg.reward)
    tracker = open_tracker(cfg.logger, out_dir, cfg)
    try:
        started = time.perf_counter()
        scores = mix.score(samples)
        seconds = time.perf_counter() - started
        names = [*scores.components, "total"]
        scored = []
        for i, row in enumerate(rows):
            values = {name: scores.value(name, i) for name in scores.components}  # what entered the total
            scored.append({**row, **values, "total": scores.total[i]})
        with open(out_dir / "scores.jsonl", "w") as f:
            for row in scored:
                f.write(json.dumps(row) + "\n")
        summary = {**summarize(scored, names), "seconds": seconds, "failures": mix.failures()}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        final = {
            "final_reward": summary["mean"]["total"],
            "steps": 0,
            "overrides": job_overrides(),
            "components": {f"reward/{k}": v for k, v in summary["mean"].items()},
        }
        (out_dir / "final.json").write_text(json.dumps(final, indent=2))
        tracker.summary({f"mean/{k}": v for k, v in summary["mean"].items()})

        console = Console()
        console.print(
            _table(
                f"Rewards for {len(rows)} samples ({seconds:.1f}s)",
                "completion",
                [(r["completion"][:48], r) for r in scored],
                names,
            )
        )
        if "by_kind" in summary:
            console.print(_table("Mean reward by kind", "kind", list(summary["by_kind"].items()), names))
        for name, failures in summary["failures"].items():
            if any(failures.values()):
                console.print(f"[yellow]{name}[/yellow]: " + ", ".join(f"{k}={v}" for k, v in failures.items()))
        for text in getattr(mix, "advice", list)():  # a reward service's client has no advice of its own
            console.print(text)
        console.print(f"outputs in {out_dir}")
        return summary
    finally:
        tracker.finish()
