"""What the default real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) make of the bundled
checks, each pair of variants side by side in this one run:

* the LLM judge in logprobs mode (p(yes) of a yes/no question) on the bundled sample: mean score
  of exact vs paraphrased vs unrelated answers, and its parse failures;
* InfoGain: mean ΔIG of contexts that hold the answer vs unrelated contexts, on the bundled
  items (made-up facts, so the model cannot know the answer without the context).

    python benchmarks/real_models.py [--items 12] [--generations 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def judge_by_kind() -> tuple[dict[str, float], int, int]:
    """Mean judge score per kind of the bundled sample, parse failures, and the sample size."""
    from hydra.utils import instantiate

    from core.rewards.base import RewardSample
    from core.training.evaluate import load_rows

    rows = load_rows(None)
    judge = instantiate(composed("reward=llm_judge").reward).components["llm_judge"][0]
    scores = judge([RewardSample(r["completion"], r["ground_truth"], r["prompt"], r["extra_info"]) for r in rows])
    kinds: dict[str, list[float]] = {}
    for row, score in zip(rows, scores, strict=True):
        kinds.setdefault(row["kind"], []).append(score)
    return {k: sum(v) / len(v) for k, v in kinds.items()}, judge.stats["parse_failures"], len(rows)


def infogain_by_context(n_items: int, generations: int) -> tuple[float, float, float]:
    """Mean ΔIG with helpful and with unrelated contexts, and the seconds it took."""
    from hydra.utils import instantiate

    engine = instantiate(composed(f"ig.num_generations={generations}", "ig.max_new_tokens=24", "seed=0").ig)
    rows = [json.loads(line) for line in (ROOT / "infogain/data/helpful_vs_unrelated.jsonl").read_text().splitlines()]
    rows = rows[:n_items]
    items = [
        {"question": r["question"], "context": r[kind], "answers": r["answers"]}
        for r in rows
        for kind in ("helpful", "unrelated")
    ]
    started = time.perf_counter()
    scores = [r["score"] for r in engine.compute(items)]
    seconds = time.perf_counter() - started
    return sum(scores[0::2]) / len(rows), sum(scores[1::2]) / len(rows), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--generations", type=int, default=6)
    args = parser.parse_args()
    kinds, failures, n = judge_by_kind()
    helpful, unrelated, seconds = infogain_by_context(args.items, args.generations)
    report(
        "Real models on the CPU: SmolLM2-135M-Instruct (judge, InfoGain generator) + MiniLM (entailment)",
        [
            (
                "judge p(yes), exact (A) vs paraphrase (B)",
                f"{kinds['exact']:.3f}",
                f"{kinds['paraphrase']:.3f}",
                f"{kinds['exact'] / kinds['paraphrase']:.2f}x",
            ),
            (
                "judge p(yes), paraphrase (A) vs unrelated (B)",
                f"{kinds['paraphrase']:.3f}",
                f"{kinds['unrelated']:.3f}",
                f"{kinds['paraphrase'] / kinds['unrelated']:.2f}x",
            ),
            ("judge parse failures", f"{failures}", f"of {n}", f"{failures / n:.0%}"),
            (
                f"mean ΔIG, helpful (A) vs unrelated (B) context, {args.items} items x {args.generations} samples",
                f"{helpful:+.4f}",
                f"{unrelated:+.4f}",
                f"{helpful - unrelated:+.4f} (diff), {seconds:.0f}s",
            ),
        ],
    )


if __name__ == "__main__":
    main()
