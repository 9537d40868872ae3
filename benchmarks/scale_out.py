"""GRPO step time with several CPU ranks, side by side in this one run, on SmolLM2-135M-Instruct:
one process (``per_device_train_batch_size=8``) vs 2 CPU ranks at the same global batch
(``processes=2``, 4 per rank), plain data parallel and DeepSpeed ZeRO-3 (parameters and optimizer
offloaded to the CPU). This machine has 2 cores, so 2 ranks cannot be faster than one process:
the figures show what the distributed path costs.

    python benchmarks/scale_out.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report, train  # noqa: E402

VARIANTS = {
    "1 process": ["trainer.per_device_train_batch_size=8"],
    "2 CPU ranks": ["processes=2", "trainer.per_device_train_batch_size=4"],
    "2 CPU ranks, ZeRO-3": ["processes=2", "trainer.per_device_train_batch_size=4", "deepspeed=zero3"],
}


def step_seconds(run_dir: Path, steps: int, overrides: list[str]) -> tuple[float, float]:
    """(median seconds per step after the first, wall seconds of the whole run)."""
    started = time.perf_counter()
    train(run_dir, steps, *overrides)
    wall = time.perf_counter() - started
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            results[name] = step_seconds(Path(tmp) / name.replace(",", "").replace(" ", "_"), args.steps, overrides)
    one, _ = results["1 process"]
    rows = [
        (
            f"GRPO step, SmolLM2, global batch 8: {name} vs 1 process (s)",
            f"{step:.2f}",
            f"{one:.2f}",
            f"{step / one:.2f}x",
        )
        for name, (step, _wall) in results.items()
        if name != "1 process"
    ]
    rows += [
        (f"wall time of {args.steps} steps, {name} (s)", f"{wall:.0f}", "", "") for name, (_s, wall) in results.items()
    ]
    report("Training ranks on the CPU", rows)


if __name__ == "__main__":
    main()
