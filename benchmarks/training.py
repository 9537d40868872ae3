"""GRPO step time with the rewards served vs embedded, both runs side by side in one invocation:
the same quickstart (tiny policy, exact match + embedding + LLM judge) once with the judge and
embedder in-process, once against ``service=llm_judge`` and ``service=embedding`` on loopback.

    python benchmarks/training.py [--steps 12] [--rounds 2]

Both variants run with the servers up (idle in the embedded runs), so each sees the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from core.serving.local_server import ROOT, LocalServer  # noqa: E402


def step_seconds(run_dir: Path, completions_per_step: int) -> float:
    """Median seconds per step, the first (warm-up) step left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(completions_per_step / r["samples_per_s"] for r in rows[1:])


def train(run_dir: Path, steps: int, *overrides: str) -> None:
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "experiment=smoke",
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.save_strategy=no",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    per_step = 8  # trainer.per_device_train_batch_size x gradient_accumulation_steps
    embedded = served = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with (
            LocalServer(tmp, "service=embedding") as emb,
            LocalServer(tmp, "service=llm_judge", "model=tiny_lm") as judge,
        ):
            for round_ in range(args.rounds):  # alternate, so drifting machine load hits both alike
                train(tmp / f"embedded{round_}", args.steps)
                embedded = min(embedded, step_seconds(tmp / f"embedded{round_}", per_step))
                train(
                    tmp / f"served{round_}",
                    args.steps,
                    "judge=remote",
                    f"judge.url={judge.url}",
                    "embedder=remote",
                    f"embedder.url={emb.url}",
                    "judging.mode=logprobs",
                    "judging.prompt_template=yes_no",
                )
                served = min(served, step_seconds(tmp / f"served{round_}", per_step))
    report(
        "GRPO quickstart step time: rewards served (A) vs embedded (B), CPU",
        [
            (
                f"median step time over {args.steps - 1} steps, best of {args.rounds} rounds",
                f"{served:.2f}s",
                f"{embedded:.2f}s",
                f"{served / embedded:.2f}x",
            )
        ],
    )


if __name__ == "__main__":
    main()
