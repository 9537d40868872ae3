"""Multirun summary, as RL users read a sweep: a Hydra callback that groups the jobs by setting
(the overrides that differ between jobs, seed excluded) and summarises each over its seeds.

Every training or evaluation job writes ``final.json`` in its own dir (training jobs also their
per-step ``metrics.jsonl``); after the sweep, in the sweep dir:

* ``sweep_jobs.csv``: one row per job (its overrides, final reward, held-out reward, components);
* ``sweep_summary.csv``: one row per setting: the number of seeds, and the mean and standard
  deviation over seeds of the final training reward and of the last held-out evaluation;
* ``sweep_summary.png``: per setting, the training reward per step as the mean over seeds with a
  band of ± one standard deviation, and beside it the held-out evaluations the same way; for
  jobs without per-step rewards (evaluations), the final reward per setting as bars with the same spread.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from hydra.experimental.callback import Callback

matplotlib.use("Agg")
log = logging.getLogger(__name__)


def _held_out_reward(final: dict) -> float | None:
    # a training run's last held-out evaluation, or an eval=policy job's trained total
    held = final.get("held_out") or {}
    if "last" in held:
        return held["last"].get("eval/reward/total")
    return (held.get("total") or {}).get("trained")


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job dir with a ``final.json``: its overrides, final and held-out reward, components."""
    rows = []
    for final_file in sorted(sweep_dir.glob("*/final.json"), key=lambda p: p.parent.name):
        final = json.loads(final_file.read_text())
        row = {
            "job": final_file.parent.name,
            "overrides": " ".join(final.get("overrides", [])),
            "final_reward": final.get("final_reward"),
            "start_reward": final.get("start_reward"),
            "held_out_reward": _held_out_reward(final),
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


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_setting(rows: list[dict]) -> list[dict]:
    """One row per setting: seeds, and mean and standard deviation over them of the final and held-out reward."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["setting"]].append(row)
    out = []
    for setting, jobs in groups.items():
        final_mean, final_std = _spread([j["final_reward"] for j in jobs])
        held_mean, held_std = _spread([j["held_out_reward"] for j in jobs])
        out.append(
            {
                "setting": setting,
                "seeds": len(jobs),
                "final_reward_mean": final_mean,
                "final_reward_std": final_std,
                "held_out_reward_mean": held_mean,
                "held_out_reward_std": held_std,
                "jobs": " ".join(j["job"] for j in jobs),
            }
        )
    return out


def curves(sweep_dir: Path, rows: list[dict], key: str) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per setting, the steps every seed logged ``key`` at and the values (seeds × steps)."""
    by_setting: dict[str, list[dict[int, float]]] = defaultdict(list)
    for row in rows:
        metrics = sweep_dir / row["job"] / "metrics.jsonl"
        if not metrics.exists():
            continue
        points = {}
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get(key) is not None:
                points[record["step"]] = record[key]
        if points:
            by_setting[row["setting"]].append(points)
    out = {}
    for setting, runs in by_setting.items():
        steps = sorted(set.intersection(*(set(r) for r in runs)))  # a shorter (failed) seed cuts the curve
        if steps:
            out[setting] = (steps, np.array([[r[s] for s in steps] for r in runs]))
    return out


def _band(ax, setting_curves, ylabel: str, title: str) -> None:
    for setting, (steps, values) in setting_curves.items():
        mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{setting} (n={len(values)})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _bars(ax, summary: list[dict]) -> None:
    labels = [s["setting"] for s in summary]
    means = [s["final_reward_mean"] or 0.0 for s in summary]
    spread = [s["final_reward_std"] or 0.0 for s in summary]
    bars = ax.bar(range(len(labels)), means, yerr=spread, capsize=4)
    ax.bar_label(bars, labels=[f"{m:.3f} (n={s['seeds']})" for m, s in zip(means, summary, strict=True)], fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("final reward (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)


def plot(sweep_dir: Path, rows: list[dict], summary: list[dict]) -> None:
    """``sweep_summary.png``: banded reward curves per setting (or bars for jobs without steps)."""
    import matplotlib.pyplot as plt

    train = curves(sweep_dir, rows, "reward/total")
    held = curves(sweep_dir, rows, "eval/reward/total")
    panels = [p for p in (train, held) if p]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.2), squeeze=False)
    if train:
        _band(axes[0][0], train, "training reward", "training reward per step (mean ± std over seeds)")
    if held:
        _band(axes[0][-1], held, "held-out reward", "held-out evaluation (mean ± std over seeds)")
    if not panels:
        _bars(axes[0][0], summary)
    fig.suptitle(f"{len(rows)} jobs, {len(summary)} settings", fontsize=11)
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_summary.png", dpi=120)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(sweep_dir: Path) -> list[dict]:
    """Write the CSVs and the PNG for the jobs under ``sweep_dir``; return the per-setting rows."""
    rows = collect(sweep_dir)
    if not rows:
        log.warning("no final.json under %s: nothing to summarise", sweep_dir)
        return []
    for row, label in zip(rows, settings(rows), strict=True):
        row["setting"] = label
    summary = per_setting(rows)
    _write_csv(sweep_dir / "sweep_jobs.csv", rows)
    _write_csv(sweep_dir / "sweep_summary.csv", summary)
    plot(sweep_dir, rows, summary)
    return summary


class SweepSummary(Callback):
    """Hydra callback: ``write_summary`` on the sweep dir when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        summary = write_summary(Path(config.hydra.sweep.dir))
        if summary:
            log.info("sweep summary of %d settings in %s", len(summary), config.hydra.sweep.dir)
