"""GRPO + LoRA training recipe: ``python run.py`` (the quickstart) and ``python run.py train=grpo``.

Setup: tokenizer and policy (``model=``), prompts (``dataset=``), the reward mix (``reward=``,
each component embedded or served by its own ``judge=``/``embedder=`` switch), TRL's
``GRPOConfig`` from the ``trainer:`` node and a PEFT LoRA adapter from ``lora:``.
Loop: TRL's ``GRPOTrainer``; ``RunLog`` writes every step to ``metrics.jsonl`` (each reward
component, the total, loss, KL, learning rate, samples/s, reward-server failures), some sample
completions to ``samples.jsonl``, and the same metrics to the tracker (``logger=``).
Cleanup: the LoRA adapter in ``adapter/``, ``reward_curve.png`` and ``final.json``.

With ``gpus > 1`` this process writes the accelerate/DeepSpeed files and re-launches itself
with ``accelerate launch``; each rank then runs this same recipe.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from core.config_errors import ConfigError, check_types, check_writable_dir
from core.models.loading import build_causal_lm, check_gpus, device_for, load_tokenizer
from core.rewards.base import as_text, trl_samples
from core.rewards.protocols import RewardScorer
from core.tasks import job_overrides
from core.training.datasets import held_out_dataset
from core.training.layout import (
    Layout,
    is_main_rank,
    layout_for,
    needs_launcher,
    run_ranks,
    slurm_restarts,
    write_deepspeed_file,
)
from core.training.tracking import NullTracker, open_tracker

matplotlib.use("Agg")
log = logging.getLogger(__name__)


class RewardRecorder:
    """A reward mix (``RewardMix`` in this process, or ``RewardClient`` for a reward service) as
    one TRL reward function per component, named after it, so TRL weighs and logs each one. The
    first function TRL calls for a batch scores it with the whole mix once; the others read their
    component from that. Under ``on_failure=skip`` a component that could not score a sample
    returns ``None`` for it, which TRL leaves out of the sample's weighted sum. Keeps the last batch."""

    def __init__(self, scorer: RewardScorer):
        self.mix = scorer
        self.names = list(scorer.weights())
        self.last: dict = {}
        self._scored = None  # the completions list of the batch in self.last

    def reward_funcs(self) -> list:
        """One TRL reward function per component, named after the component."""
        return [self._component(name) for name in self.names]

    def weights(self) -> list[float]:
        """The components' weights, in the order of ``reward_funcs``."""
        return list(self.mix.weights().values())

    def _score_batch(self, prompts, completions, kwargs) -> None:
        # TRL hands every reward function the same completions list for one batch
        if self._scored is not completions:
            scores = self.mix.score(trl_samples(prompts, completions, **kwargs))
            self._scored = completions
            self.last = {"prompts": prompts, "completions": completions}
            self.last.update({n: [scores.value(n, i) for i in range(len(completions))] for n in self.names})

    def _component(self, name: str):
        def reward_func(prompts=None, completions=None, **kwargs):
            self._score_batch(prompts, completions, kwargs)
            return self.last[name]

        reward_func.__name__ = name
        return reward_func


class RunLog(TrainerCallback):
    """Writes each logged step to metrics.jsonl, samples.jsonl and the tracker (rank 0 only), and
    each held-out evaluation to metrics.jsonl as a row of ``eval/reward/*`` keys."""

    def __init__(
        self, run_dir: Path, recorder: RewardRecorder, tracker, completions_per_step: int, samples_per_step: int = 4
    ):
        self.metrics_file = run_dir / "metrics.jsonl"
        self.samples_file = run_dir / "samples.jsonl"
        self.recorder, self.tracker = recorder, tracker
        self.completions_per_step = completions_per_step
        self.samples_per_step = samples_per_step
        self.rows: list[dict] = []  # training steps
        self.eval_rows: list[dict] = []  # held-out evaluations
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="GRPO", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_reward" in logs:
            self._held_out_row(state.global_step, logs)
        if "reward" not in logs:
            return
        names = self.recorder.names
        # wall-clock seconds since the epoch, so step times include everything between steps
        row = {"step": state.global_step, "time": round(time.time(), 3), "reward/total": logs["reward"]}
        row.update({f"reward/{n}": logs.get(f"rewards/{n}/mean") for n in names})
        row.update(
            loss=logs.get("loss"),
            kl=logs.get("kl"),
            lr=logs.get("learning_rate"),
            completion_length=logs.get("completions/mean_length"),
        )
        if logs.get("step_time"):
            row["samples_per_s"] = self.completions_per_step / logs["step_time"]
        for name, failures in self.recorder.mix.failures().items():
            row.update({f"failures/{name}/{k}": v for k, v in failures.items()})
        self.rows.append(row)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=state.global_step)
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{row['reward/total']:.3f}", kl=f"{row['kl'] or 0:.2g}", refresh=False)
        self._write_samples(state.global_step, names)

    def _held_out_row(self, step: int, logs: dict) -> None:
        # TRL's evaluation loop on the held-out prompts: its means under eval_*, one row per evaluation
        row = {"step": step, "time": round(time.time(), 3), "eval/reward/total": logs["eval_reward"]}
        row.update({f"eval/reward/{n}": logs.get(f"eval_rewards/{n}/mean") for n in self.recorder.names})
        self.eval_rows.append(row)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)

    def _write_samples(self, step: int, names: list[str]) -> None:
        last = self.recorder.last
        with open(self.samples_file, "a") as f:
            for i in range(min(self.samples_per_step, len(last.get("completions") or []))):
                sample = {
                    "step": step,
                    "prompt": as_text(last["prompts"][i]),
                    "completion": as_text(last["completions"][i]),
                    "rewards": {n: last[n][i] for n in names if n in last},
                }
                f.write(json.dumps(sample) + "\n")


def checkpoint_complete(folder: Path) -> bool:
    """Whether a ``checkpoint-*`` folder was written to the end: the trainer writes
    ``trainer_state.json`` last, so a run killed while saving leaves it missing or cut short."""
    try:
        return "global_step" in json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def find_checkpoint(resume, checkpoints_dir: Path) -> str | None:
    """The checkpoint to resume from: ``None``/false (none), ``latest``/true (the newest complete
    one in this run's ``checkpoints/``), or a path to a checkpoint or to an earlier run dir.

    A checkpoint a killed run left half-written is never resumed from: it is removed (with a
    warning), so the run goes on from the last complete one and saves that step again."""
    if resume in (None, False, "", "none"):
        return None
    if resume is True or resume == "latest":
        where = checkpoints_dir
    else:
        where = Path(str(resume))
        if (where / "trainer_state.json").exists():
            if not checkpoint_complete(where):
                raise ConfigError(f"resume={resume}: the checkpoint is incomplete (its trainer_state.json)")
            return str(where)
        if (where / "checkpoints").is_dir():
            where = where / "checkpoints"
    found = sorted(where.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if where.is_dir() else []
    while found and not checkpoint_complete(found[-1]):
        log.warning("removing %s: written only in part (the run was stopped while saving it)", found[-1])
        shutil.rmtree(found.pop(), ignore_errors=True)  # every rank may get here
    if not found:
        raise ConfigError(f"resume={resume}: no complete checkpoint-* under {where}")
    return str(found[-1])


def resume_setting(resume, run_dir: Path):
    """``resume`` as set, except in a job SLURM requeued (preempted, ``scontrol requeue``): there
    an unset ``resume`` is ``latest`` when the run dir holds a complete checkpoint, so the job goes
    on from it instead of starting over."""
    restarts = slurm_restarts()
    if resume not in (None, False, "", "none") or not restarts:
        return resume
    if not any(checkpoint_complete(c) for c in (run_dir / "checkpoints").glob("checkpoint-*")):
        return resume
    log.info("requeued by SLURM (restart %d): resuming from the latest complete checkpoint", restarts)
    return "latest"


def lora_config(node: Mapping, task_type: str = "CAUSAL_LM"):
    """A PEFT ``LoraConfig`` from the ``lora:`` node (r, alpha, dropout, target_modules, modules_to_save)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(node["r"]),
        lora_alpha=int(node["alpha"]),
        lora_dropout=float(node["dropout"]),
        target_modules=list(node["target_modules"]),
        modules_to_save=list(node.get("modules_to_save") or []) or None,
        task_type=task_type,
    )


def wants_held_out(cfg) -> bool:
    """Whether the ``trainer:`` node asks for TRL's evaluation loop (``eval_strategy`` not ``no``)."""
    return str(cfg.trainer.get("eval_strategy") or "no") != "no"


def grpo_args(
    cfg, run_dir: Path, layout: Layout, weights: list[float], deepspeed_file: Path | None, held_out: bool = True
):
    """TRL's ``GRPOConfig``: the ``trainer:`` node (GRPOConfig's own names) plus what the run decides
    (``held_out=False``: no evaluation loop, whatever the node says)."""
    from trl import GRPOConfig

    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not held_out:
        trainer.update(eval_strategy="no", eval_on_start=False)
    if trainer.get("bf16") is None:
        trainer["bf16"] = layout.mixed_precision == "bf16"
    return GRPOConfig(
        output_dir=str(run_dir / "checkpoints"),
        **trainer,
        reward_weights=weights,
        seed=int(cfg.seed),
        report_to=[],
        use_cpu=layout.device == "cpu",
        deepspeed=str(deepspeed_file) if deepspeed_file else None,
    )


def plot_rewards(rows: list[dict], path: Path, eval_rows: list[dict] = ()) -> None:
    """Reward per step: the total and each component; the held-out evaluations' total beside them."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in [k for k in rows[0] if k.startswith("reward/")]:
        values = [r.get(key) for r in rows]
        ax.plot(
            steps,
            values,
            marker="o",
            markersize=3,
            linewidth=2.2 if key == "reward/total" else 1.2,
            label=key.split("/", 1)[1],
        )
    if eval_rows:
        ax.plot(
            [r["step"] for r in eval_rows],
            [r["eval/reward/total"] for r in eval_rows],
            "k--s",
            linewidth=2,
            markersize=5,
            label="held-out total",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO reward per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _relaunch(layout: Layout, run_dir: Path) -> dict:
    log.info("starting %d ranks (%s, %d node(s))", layout.world_size, layout.backend, layout.nodes)
    run_ranks(layout, sys.argv, run_dir)
    return json.loads((run_dir / "final.json").read_text())


def run(cfg) -> dict:
    """Entry point of ``python run.py train=grpo``: a causal LM on ``dataset=`` prompts."""

    def build():
        tokenizer = load_tokenizer(cfg.model)
        model = build_causal_lm(cfg.model, tokenizer, device_for(int(cfg.gpus)))
        return model, tokenizer, instantiate(cfg.dataset), instantiate(cfg.reward)

    return train(cfg, build, lambda: held_out_dataset(cfg))


def train(cfg, build, held_out=None) -> dict:
    """The GRPO + LoRA recipe around any policy. ``build()`` returns (model, processing class,
    train dataset, reward mix: a ``RewardScorer``); it runs only in a process that trains (with ``gpus > 1``, after
    the relaunch under accelerate, on every rank). ``held_out()`` returns the prompts TRL's
    evaluation loop scores when ``trainer.eval_strategy`` asks for it (or ``None``: no evaluation).
    The rest of ``cfg``: ``trainer``, ``lora``, ``resume``, ``checkpoints``, ``logger``,
    ``deepspeed``, ``gpus``, ``seed``."""
    # Hydra makes it for a CLI run, a caller from Python may not; either way a run that could not
    # save its checkpoints stops here, before the model loads.
    from trl import GRPOConfig, GRPOTrainer

    check_types(cfg, {"trainer": GRPOConfig})
    run_dir = check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    check_gpus(int(cfg.gpus))
    resume_from = find_checkpoint(resume_setting(cfg.resume, run_dir), run_dir / "checkpoints")  # fails before any work
    layout = layout_for(int(cfg.gpus), cfg.deepspeed.config, cfg.get("processes"), int(cfg.get("nodes") or 1))
    if needs_launcher(layout):
        return _relaunch(layout, run_dir)
    main_rank = is_main_rank()
    if main_rank:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    deepspeed_file = write_deepspeed_file(layout, run_dir)  # every rank reads it: each writes the same

    model, processing_class, dataset, mix = build()
    eval_dataset = held_out() if held_out is not None and wants_held_out(cfg) else None
    if wants_held_out(cfg) and eval_dataset is None:
        log.warning(
            "trainer.eval_strategy=%s, but this dataset has no held-out split: no held-out evaluation "
            "(dataset=files: held_out.path=<file>)",
            cfg.trainer.eval_strategy,
        )
    recorder = RewardRecorder(mix)
    args = grpo_args(cfg, run_dir, layout, recorder.weights(), deepspeed_file, held_out=eval_dataset is not None)
    tracker = open_tracker(cfg.logger, run_dir, cfg) if main_rank else NullTracker()
    run_log = RunLog(
        run_dir,
        recorder,
        tracker,
        args.per_device_train_batch_size * args.gradient_accumulation_steps * layout.num_processes,
    )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=recorder.reward_funcs(),
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=lora_config(cfg.lora),
        callbacks=[run_log],
    )
    trainer.remove_callback(ProgressCallback)  # it prints every log dict; RunLog keeps a quieter bar
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        # every rank: under ZeRO-3 the adapter's shards are gathered to rank 0, which writes it
        trainer.save_model(str(run_dir / "adapter"))
        if not trainer.is_world_process_zero():
            return {}
        return _finish(cfg, run_dir, run_log, recorder.mix)
    finally:
        tracker.finish()


def _finish(cfg, run_dir: Path, run_log: RunLog, mix: RewardScorer) -> dict:
    rows, evals = run_log.rows, run_log.eval_rows
    if rows:
        plot_rewards(rows, run_dir / "reward_curve.png", evals)
    if cfg.checkpoints.cleanup_at_end:  # as the Lewis reference scripts, keep only the final adapter
        for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    tail = rows[-3:]
    final = {
        "steps": rows[-1]["step"] if rows else 0,
        "start_reward": rows[0]["reward/total"] if rows else None,
        "final_reward": sum(r["reward/total"] for r in tail) / len(tail) if tail else None,
        "components": {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("reward/")},
        "failures": mix.failures(),
        # the first and last held-out evaluations (with eval_on_start, the first is the base model's)
        "held_out": {"first": evals[0], "last": evals[-1]} if evals else None,
        "overrides": job_overrides(),
        "device": "cuda" if torch.cuda.is_available() and int(cfg.gpus) > 0 else "cpu",
    }
    (run_dir / "final.json").write_text(json.dumps(final, indent=2))
    log.info("final reward %.4f after %d steps; outputs in %s", final["final_reward"] or 0, final["steps"], run_dir)
    return final
