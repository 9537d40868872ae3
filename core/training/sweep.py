"""Multirun summary: a Hydra callback that tabulates and plots each job's final reward.

Every training or evaluation job writes ``final.json`` in its own dir; after the sweep this
writes ``sweep_summary.csv`` (one row per job) and ``sweep_summary.png`` (final reward per
setting, the mean over seeds with their spread) into the sweep dir.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
from hydra.experimental.callback import Callback

matplotlib.use("Agg")
log = logging.getLogger(__name__)


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job dir with a ``final.json``: its overrides, final reward and components."""
    rows = []
    for final_file in sorted(sweep_dir.glob("*/final.json"), key=lambda p: p.parent.name):
        final = json.loads(final_file.read_text())
        row = {
            "job": final_file.parent.name,
            "overrides": " ".join(final.get("overrides", [])),
            "final_reward": final.get("final_reward"),
            "start_reward": final.get("start_reward"),
            "steps": final.get("steps"),
        }
        row.update(final.get("components", {}))
        rows.append(row)
    return rows


def settings(rows: list[dict]) -> list[str]:
    """Each job's setting: the overrides that differ between jobs, seed excluded (so jobs that
    differ only in seed share a setting)."""
    parsed = [dict(o.split("=", 1) for o in row["overrides"].split() if "=" in o) for row in rows]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if k != "seed" and len({p.get(k) for p in parsed}) > 1]
    return [" ".join(f"{k}={p[k]}" for k in varying if k in p) or "(all the same)" for p in parsed]


def write_summary(sweep_dir: Path) -> list[dict]:
    """Write the CSV and PNG for the jobs under ``sweep_dir``; return the rows."""
    import matplotlib.pyplot as plt

    rows = collect(sweep_dir)
    if not rows:
        log.warning("no final.json under %s: nothing to summarise", sweep_dir)
        return rows
    for row, label in zip(rows, settings(rows), strict=True):
        row["setting"] = label
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["final_reward"] is not None:
            groups[row["setting"]].append(row["final_reward"])
    labels = list(groups)
    means = [statistics.fmean(groups[k]) for k in labels]
    spread = [statistics.pstdev(groups[k]) if len(groups[k]) > 1 else 0.0 for k in labels]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 4))
    bars = ax.bar(range(len(labels)), means, yerr=spread, capsize=4, color="#4C72B0")
    ax.bar_label(
        bars,
        labels=[f"{m:.3f} (n={len(groups[k])})" for m, k in zip(means, labels, strict=True)],
        padding=3,
        fontsize=8,
    )
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("final reward (mean over seeds)")
    ax.set_title(f"{len(rows)} jobs, {len(labels)} settings")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_summary.png", dpi=120)
    plt.close(fig)
    return rows


class SweepSummary(Callback):
    """Hydra callback: ``write_summary`` on the sweep dir when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        rows = write_summary(Path(config.hydra.sweep.dir))
        if rows:
            log.info("sweep summary of %d jobs in %s", len(rows), config.hydra.sweep.dir)
