"""``python run.py eval=policy policy_eval.adapter=<run dir>``: does the trained adapter do better
than the base model on prompts it never trained on?

Both the base model and the base model with the adapter merged answer the same held-out prompts
(the ``held_out:`` node: the dataset's test split, or a file), greedily by default, through the
in-process generation engine; the reward mix scores both. For each component and the total:
the base mean, the trained mean, their difference and a paired bootstrap confidence interval of
the difference (prompts resampled with replacement). Written to the run dir:

* ``policy_eval.json``: those figures (and ``final.json`` with the trained total, for sweeps);
* ``policy_eval.jsonl``: per prompt, both completions and their scores;
* ``policy_eval.png``: base vs trained per component, the interval on the difference.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import matplotlib
import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from core.config_errors import ConfigError
from core.models.generation import SamplingParams
from core.models.generation_engine import GenerationEngine
from core.rewards.base import RewardSample, as_text
from core.tasks import job_overrides
from core.training.datasets import held_out_dataset

matplotlib.use("Agg")
log = logging.getLogger(__name__)


def adapter_dir(path: str) -> Path:
    """The adapter folder of ``path``: a training run dir (its ``adapter/``) or the folder itself."""
    where = Path(str(path))
    for candidate in (where / "adapter", where):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise ConfigError(f"policy_eval.adapter={path}: no adapter_config.json there or in its adapter/ folder")


def max_new_tokens(node, adapter: Path) -> int:
    """``policy_eval.max_new_tokens``, or (null) the training run's ``trainer.max_completion_length``
    when the adapter sits in a run dir with its ``config_resolved.yaml``, else 64."""
    if node.max_new_tokens is not None:
        return int(node.max_new_tokens)
    resolved = adapter.parent / "config_resolved.yaml"
    if resolved.exists():
        trained = OmegaConf.load(resolved)
        length = OmegaConf.select(trained, "trainer.max_completion_length")
        if length:
            return int(length)
    return 64


def bootstrap_interval(diffs: np.ndarray, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of paired differences.

    >>> lo, hi = bootstrap_interval(np.array([1.0] * 20), 500, 0.95, 0)
    >>> (lo, hi)
    (1.0, 1.0)
    """
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def compare(base: dict[str, list[float]], trained: dict[str, list[float]], node) -> dict[str, dict]:
    """Per score column: base and trained means, their difference and its bootstrap interval."""
    out = {}
    for name in base:
        b, t = np.asarray(base[name], dtype=float), np.asarray(trained[name], dtype=float)
        low, high = bootstrap_interval(t - b, int(node.bootstrap), float(node.confidence), int(node.seed))
        out[name] = {
            "base": float(b.mean()),
            "trained": float(t.mean()),
            "difference": float((t - b).mean()),
            "interval": [low, high],
        }
    return out


def _generate(engine: GenerationEngine, prompts: list, params: SamplingParams) -> list[str]:
    chats = [p for p in prompts if not isinstance(p, str)]
    if chats and len(chats) != len(prompts):
        raise ConfigError("held-out prompts mix chat messages and plain strings; give one kind")
    groups = engine.chat(chats, params) if chats else engine.complete(prompts, params)
    return [group[0].text for group in groups]


def _scores(mix, rows, completions: list[str]) -> dict[str, list[float]]:
    samples = [
        RewardSample(c, r["ground_truth"], as_text(r["prompt"]), dict(r.get("extra_info") or {}), r["data_source"])
        for r, c in zip(rows, completions, strict=True)
    ]
    scores = mix.score(samples)
    columns = {name: [scores.value(name, i) for i in range(len(samples))] for name in scores.components}
    columns["total"] = list(scores.total)
    return columns


def plot(figures: dict[str, dict], path: Path, title: str) -> None:
    """Base vs trained bars per score column, the difference's interval as an error bar on the trained bar."""
    import matplotlib.pyplot as plt

    names = list(figures)
    x = np.arange(len(names))
    base = [figures[n]["base"] for n in names]
    trained = [figures[n]["trained"] for n in names]
    errors = np.array(
        [
            [figures[n]["difference"] - figures[n]["interval"][0] for n in names],
            [figures[n]["interval"][1] - figures[n]["difference"] for n in names],
        ]
    )
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 4))
    ax.bar(x - 0.2, base, 0.4, label="base", color="#999999")
    bars = ax.bar(x + 0.2, trained, 0.4, yerr=errors, capsize=4, label="trained (interval of the difference)")
    ax.bar_label(bars, labels=[f"{figures[n]['difference']:+.3f}" for n in names], padding=3, fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("mean reward on held-out prompts")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg) -> dict:
    """Entry point of ``python run.py eval=policy``."""
    from peft import PeftModel

    node = cfg.policy_eval
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = adapter_dir(node.adapter)  # fails before any model loads
    rows = held_out_dataset(cfg)
    if rows is None:
        raise ConfigError("eval=policy needs held-out prompts: a dataset with a test split, or held_out.path=<file>")
    rows = rows.to_list()
    prompts = [r["prompt"] for r in rows]
    params = SamplingParams(n=1, temperature=float(node.temperature), max_tokens=max_new_tokens(node, adapter), seed=0)
    mix = instantiate(cfg.reward)
    started = time.perf_counter()
    engine = GenerationEngine(OmegaConf.to_container(cfg.model, resolve=True), gpus=int(cfg.gpus))
    base_text = _generate(engine, prompts, params)
    engine.model = PeftModel.from_pretrained(engine.model, str(adapter)).merge_and_unload().eval()
    trained_text = _generate(engine, prompts, params)
    base, trained = _scores(mix, rows, base_text), _scores(mix, rows, trained_text)
    figures = compare(base, trained, node)
    seconds = time.perf_counter() - started

    with open(out_dir / "policy_eval.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "prompt": as_text(row["prompt"]),
                        "ground_truth": row["ground_truth"],
                        "base": {"completion": base_text[i], **{k: v[i] for k, v in base.items()}},
                        "trained": {"completion": trained_text[i], **{k: v[i] for k, v in trained.items()}},
                    }
                )
                + "\n"
            )
    summary = {
        "adapter": str(adapter),
        "prompts": len(rows),
        "max_new_tokens": params.max_tokens,
        "confidence": float(node.confidence),
        "bootstrap": int(node.bootstrap),
        "seconds": seconds,
        "scores": figures,
        "failures": mix.failures(),
    }
    (out_dir / "policy_eval.json").write_text(json.dumps(summary, indent=2))
    final = {
        "final_reward": figures["total"]["trained"],
        "steps": 0,
        "overrides": job_overrides(),
        "components": {f"held_out/{k}": v["trained"] for k, v in figures.items()},
        "held_out": figures,
    }
    (out_dir / "final.json").write_text(json.dumps(final, indent=2))
    title = f"{len(rows)} held-out prompts, base vs {adapter.parent.name}/{adapter.name}"
    plot(figures, out_dir / "policy_eval.png", title)

    table = Table(title=f"{title} ({seconds:.0f}s; {node.confidence:.0%} bootstrap interval)")
    for column in ("score", "base", "trained", "difference", "interval"):
        table.add_column(column, justify="left" if column == "score" else "right")
    for name, f in figures.items():
        low, high = f["interval"]
        table.add_row(
            name, f"{f['base']:.3f}", f"{f['trained']:.3f}", f"{f['difference']:+.3f}", f"[{low:+.3f}, {high:+.3f}]"
        )
    Console().print(table)
    Console().print(f"outputs in {out_dir}")
    return summary
