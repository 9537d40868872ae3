"""GRPO step time of our recipe against a bare TRL ``GRPOTrainer`` + PEFT script, side by side:
the quickstart (``python run.py``: SmolLM2-135M-Instruct, the bundled QA prompts, format +
exact-match rewards, LoRA r 8 on every projection, 8 completions of 16 tokens per step) and the
same model, prompts, reward logic, ``GRPOConfig`` and ``LoraConfig`` written the way a TRL user
writes them (this file's ``--bare`` mode, run in its own process). Each variant's step time is
the median wall time between two logged steps (everything the run does per step), the first
(warm-up) step left out; rounds alternate. Both runs should do the same work (the same rewards
and completion lengths at every step); the like-for-like row sums TRL's own ``step_time`` over
the steps where they did, and the time outside it is our callbacks, logging and reward
wrappers. Step-to-step noise on this machine is larger than the recipe's cost (the same step
took 6.1 s in one process and 7.9 s in another).

    python benchmarks/grpo_vs_trl.py [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report, train  # noqa: E402
from core.serving.local_server import ROOT  # noqa: E402

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def quickstart_config():
    """The quickstart's composed config (model, dataset, trainer and LoRA settings)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=none"])


def bare(out: Path, steps: int) -> None:
    """A bare TRL + PEFT GRPO run on the quickstart's model, data and settings (step times to ``out``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from core.models.loading import model_path

    cfg = quickstart_config()
    set_seed(int(cfg.seed))  # before the LoRA weights are drawn, as the recipe seeds before building
    path = model_path(cfg.model)  # the packaged SmolLM2, converted once to a Hugging Face folder
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    dataset = instantiate(cfg.dataset)

    def text(completion) -> str:
        return completion[0]["content"] if isinstance(completion, list) else completion

    def format_reward(completions, **kwargs):
        return [1.0 if ANSWER.search(text(c)) else 0.0 for c in completions]

    def exact_match(completions, ground_truth, **kwargs):
        def norm(s: str) -> str:
            return " ".join(s.lower().strip().strip(".").split())

        scores = []
        for c, truths in zip(completions, ground_truth, strict=True):
            found = ANSWER.findall(text(c))
            answer = found[-1] if found else text(c)
            scores.append(1.0 if norm(answer) in {norm(t) for t in truths} else 0.0)
        return scores

    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.update(max_steps=steps, save_strategy="no", disable_tqdm=True)
    lora = cfg.lora
    times: list[float] = []

    logged: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                times.append(time.time())
                logged.append(dict(logs))

    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[format_reward, exact_match],
        args=GRPOConfig(
            output_dir=str(out / "checkpoints"), seed=int(cfg.seed), report_to=[], use_cpu=True, **trainer_args
        ),
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        ),
        callbacks=[StepTimes()],
    )
    trainer.train()
    (out / "step_times.json").write_text(json.dumps(times))
    (out / "logs.json").write_text(json.dumps(logged))


def ours(out: Path, steps: int) -> None:
    """The quickstart through ``run.py`` (step times from its ``metrics.jsonl``)."""
    train(out, steps)


def steps_of(out: Path, completions_per_step: int) -> list[dict]:
    """Per logged step of either run: wall ``time``, TRL's own ``step_time``, ``reward`` and
    mean completion length."""
    if (out / "logs.json").exists():
        logs = json.loads((out / "logs.json").read_text())
        times = json.loads((out / "step_times.json").read_text())
        return [
            {"time": t, "step_time": g["step_time"], "reward": g["reward"], "length": g["completions/mean_length"]}
            for t, g in zip(times, logs, strict=True)
        ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "time": r["time"],
            "step_time": completions_per_step / r["samples_per_s"],
            "reward": r["reward/total"],
            "length": r["completion_length"],
        }
        for r in rows
    ]


def summary(steps: list[dict]) -> tuple[float, float]:
    """(median wall seconds per step, median seconds outside TRL's step), the first step left out."""
    walls = [b["time"] - a["time"] for a, b in zip(steps[1:-1], steps[2:], strict=True)]
    outside = [w - b["step_time"] for w, b in zip(walls, steps[2:], strict=True)]
    return statistics.median(walls), statistics.median(outside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare(args.bare, args.steps)
        return
    cfg = quickstart_config()
    per_step = int(cfg.trainer.per_device_train_batch_size) * int(cfg.trainer.gradient_accumulation_steps)
    runs: dict[str, list[list[dict]]] = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternate, so drifting machine load hits both alike
            run_dir = Path(tmp) / f"ours{round_}"
            ours(run_dir, args.steps)
            runs["ours"].append(steps_of(run_dir, per_step))
            run_dir = Path(tmp) / f"bare{round_}"
            run_dir.mkdir()
            subprocess.run(
                [sys.executable, __file__, "--bare", str(run_dir), "--steps", str(args.steps)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            runs["bare"].append(steps_of(run_dir, per_step))
    # Same seed, model, data and settings: both runs should do the same work, step by step. Where
    # they part (sampling on two processes can round differently), later steps generate other
    # completions of other lengths; the like-for-like figure sums the steps before that.
    alike = {"ours": 0.0, "bare": 0.0, "steps": 0}
    for a, b in zip(runs["ours"], runs["bare"], strict=True):
        for x, y in list(zip(a, b, strict=True))[1:]:  # the first (warm-up) step left out
            if (round(x["reward"], 4), x["length"]) != (round(y["reward"], 4), y["length"]):
                break
            alike["ours"] += x["step_time"]
            alike["bare"] += y["step_time"]
            alike["steps"] += 1
    same = alike["steps"] == sum(len(r) - 1 for r in runs["ours"])
    wall = {k: min(summary(r)[0] for r in v) for k, v in runs.items()}
    outside = {k: statistics.median(summary(r)[1] for r in v) for k, v in runs.items()}
    what = f"SmolLM2-135M, {per_step} completions x {cfg.trainer.max_completion_length} tokens, LoRA r {cfg.lora.r}"
    report(
        "GRPO step time: our recipe (A) vs bare TRL GRPOTrainer + PEFT (B), CPU",
        [
            (
                f"{what}: median step, best of {args.rounds} rounds",
                f"{wall['ours']:.2f}s",
                f"{wall['bare']:.2f}s",
                f"{wall['ours'] / wall['bare']:.2f}x",
            ),
            (
                "time per step outside TRL's own step (callbacks, logging, rewards' wrappers), median",
                f"{outside['ours'] * 1000:.0f} ms",
                f"{outside['bare'] * 1000:.0f} ms",
                f"{(outside['ours'] - outside['bare']) * 1000:+.0f} ms",
            ),
            (
                f"TRL's step time summed over the {alike['steps']} steps both runs did alike",
                f"{alike['ours']:.1f}s",
                f"{alike['bare']:.1f}s",
                f"{alike['ours'] / alike['bare']:.2f}x" if alike["steps"] else "-",
            ),
            ("same completions and rewards at every step", str(same), "", ""),
        ],
    )


if __name__ == "__main__":
    main()
