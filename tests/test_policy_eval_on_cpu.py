"""Held-out evaluation: TRL's evaluation loop during training (its curve in metrics.jsonl and
reward_curve.png), eval=policy comparing the base model with a trained adapter, and sweep
summaries with bands over seeds."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from conftest import run_in_process
from core.training.sweep import write_summary

TRAIN = [
    "experiment=smoke",
    "logger=none",
    "reward=digits",  # a reward a tiny random policy gets now and then: its adapter moves
    "trainer.max_steps=2",
    "trainer.save_strategy=no",
    "trainer.learning_rate=0.05",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=1",
    "trainer.eval_on_start=true",
    "trainer.per_device_eval_batch_size=8",
    "held_out.limit=8",
]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_evaluates_held_out_prompts_and_eval_policy_compares_base_and_trained(tmp_path):
    run = tmp_path / "train"
    final = run_in_process(run, *TRAIN)
    held = [r for r in jsonl(run / "metrics.jsonl") if "eval/reward/total" in r]
    assert [r["step"] for r in held] == [0, 1, 2]  # before the first step (the base model), then each step
    for row in held:
        assert row["eval/reward/total"] == pytest.approx(row["eval/reward/digits"])
    assert final["held_out"]["first"] == held[0] and final["held_out"]["last"] == held[-1]
    assert [r["step"] for r in jsonl(run / "metrics.jsonl") if "reward/total" in r] == [1, 2]

    out = tmp_path / "eval"
    summary = run_in_process(
        out,
        "eval=policy",
        "model=tiny_lm",
        "reward=qa_format",
        "logger=none",
        f"policy_eval.adapter={run}",
        "held_out.limit=8",
    )
    assert summary["prompts"] == 8 and set(summary["scores"]) == {"format", "exact_match", "total"}  # any mix
    rows = jsonl(out / "policy_eval.jsonl")
    assert len(rows) == 8 and all(r["prompt"] for r in rows)
    # the adapter was loaded: it changes the replies the base model gives
    assert any(r["base"]["completion"] != r["trained"]["completion"] for r in rows)
    for name, figures in summary["scores"].items():
        base = statistics.fmean(r["base"][name] for r in rows)
        trained = statistics.fmean(r["trained"][name] for r in rows)
        assert figures["base"] == pytest.approx(base) and figures["trained"] == pytest.approx(trained)
        assert figures["difference"] == pytest.approx(trained - base)
        low, high = figures["interval"]
        assert low <= figures["difference"] + 1e-9 and figures["difference"] <= high + 1e-9
    assert json.loads((out / "policy_eval.json").read_text())["scores"] == summary["scores"]
    assert (out / "policy_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["max_new_tokens"] == 16  # the training run's trainer.max_completion_length


def test_eval_policy_refuses_a_folder_without_an_adapter(tmp_path):
    from core.config_errors import ConfigError

    with pytest.raises(ConfigError, match="no adapter_config.json"):
        run_in_process(tmp_path / "eval", "eval=policy", "model=tiny_lm", f"policy_eval.adapter={tmp_path}")


def test_sweep_summary_averages_seeds_per_setting_with_bands(tmp_path):
    # four finished jobs: two settings x two seeds, with per-step and held-out rewards
    curves = {"0": [0.1, 0.3, 0.5], "1": [0.3, 0.5, 0.9], "2": [0.0, 0.1, 0.2], "3": [0.2, 0.1, 0.0]}
    for job, values in curves.items():
        folder = tmp_path / job
        folder.mkdir()
        setting = "lora.r=4" if job in "01" else "lora.r=8"
        seed = 1 + int(job) % 2
        lines = [{"step": s + 1, "reward/total": v} for s, v in enumerate(values)]
        lines += [{"step": 0, "eval/reward/total": 0.0}, {"step": 3, "eval/reward/total": values[-1] / 2}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        final = {
            "overrides": [f"seed={seed}", setting],
            "final_reward": values[-1],
            "steps": 3,
            "held_out": {"first": lines[-2], "last": lines[-1]},
        }
        (folder / "final.json").write_text(json.dumps(final))
    write_summary(tmp_path)
    with open(tmp_path / "sweep_summary.csv") as f:
        summary = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"lora.r=4", "lora.r=8"}
    r4 = summary["lora.r=4"]
    assert r4["seeds"] == "2" and float(r4["final_reward_mean"]) == pytest.approx(0.7)
    assert float(r4["final_reward_std"]) == pytest.approx(statistics.stdev([0.5, 0.9]))
    assert float(r4["held_out_reward_mean"]) == pytest.approx(0.35)
    assert float(summary["lora.r=8"]["held_out_reward_std"]) == pytest.approx(statistics.stdev([0.1, 0.0]))
    with open(tmp_path / "sweep_jobs.csv") as f:
        assert [r["job"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
