"""Several training ranks on the CPU through the relaunch that ``gpus=N`` uses (``processes=2``):
plain data parallel and DeepSpeed ZeRO-3, rank-0 artefacts, the global batch, the launcher killed
and the run resumed, a rank that dies on its own. Real processes, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from core.serving.local_server import LocalServer

TINY = ["experiment=smoke", "logger=none", "processes=2", "trainer.per_device_train_batch_size=4"]


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python run.py <overrides>`` started as a user starts it (the relaunch reads its argv)."""
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - the child writes it
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    out = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks under a launcher (torchrun's children that run run.py)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "LOCAL_RANK" in child.environ() and any("run.py" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_two_cpu_ranks_train_with_the_global_batch_and_rank0_writes_the_artefacts(tmp_path):
    with LocalServer(tmp_path, "service=reward", "reward=qa_format") as service:
        run = tmp_path / "ddp"
        out = finish(launch(run, *TINY, "trainer.max_steps=3", "reward=remote", f"reward.url={service.url}"), run)
        # every completion of both ranks was scored once: 3 steps x 4 per rank x 2 ranks, as one
        # process with per_device_train_batch_size=8 scores them
        assert service.metric("reward_model_items_total") == 3 * 8
    assert "starting 2 ranks (gloo, 1 node(s))" in out
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]  # rank 0 alone writes it
    assert all(r["samples_per_s"] > 0 for r in rows(run / "metrics.jsonl"))
    assert {s["step"] for s in rows(run / "samples.jsonl")} == {1, 2, 3}
    for artefact in ("adapter/adapter_model.safetensors", "final.json", "reward_curve.png", "config_resolved.yaml"):
        assert (run / artefact).exists(), artefact
    assert json.loads((run / "final.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_zero3_on_two_cpu_ranks_saves_the_whole_gathered_adapter(tmp_path):
    import torch
    from omegaconf import OmegaConf
    from peft import PeftModel
    from safetensors.torch import load_file

    from core.models.loading import build_causal_lm, load_tokenizer

    run = tmp_path / "zero3"
    # The trainer's torch AdamW steps the offloaded shards instead of DeepSpeed's CPU Adam: that op
    # is C++ compiled on first use (about 70 s here, once per machine), and the point of this test
    # is ZeRO-3's sharding, offload and gather on save, which do not depend on the optimizer.
    torch_adam = ["~deepspeed.config.optimizer", "+deepspeed.config.zero_force_ds_cpu_optimizer=false"]
    zero3 = [*TINY, "deepspeed=zero3", *torch_adam, "trainer.max_steps=3", "trainer.save_strategy=no"]
    finish(launch(run, *zero3), run, timeout=600)
    ds = json.loads((run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all(v.dim() == 2 and v.numel() > 0 for v in weights.values())  # whole matrices, no shards
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero: all trained
    # the adapter loads into the base model (the tiny model's weights come from its seed) and moves it
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_lm.yaml"))
    tokenizer = load_tokenizer(model_cfg)
    base = build_causal_lm(model_cfg, tokenizer, torch.device("cpu"))
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits.log_softmax(-1)
        trained = PeftModel.from_pretrained(base, run / "adapter")
        after = trained(ids).logits.log_softmax(-1)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_a_killed_launcher_takes_its_ranks_along_and_resume_continues_to_the_same_end(tmp_path):
    run = tmp_path / "killed"
    common = [*TINY, "trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=3"]
    proc = launch(run, *common)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-2"
        time.sleep(0.2)
    ranks = ranks_of(proc)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=30)  # the ranks stop with their launcher
    assert not alive, [p.pid for p in alive]
    assert not (run / "final.json").exists()
    finish(launch(run, *common, "resume=latest"), run)
    final = json.loads((run / "final.json").read_text())
    assert final["steps"] == 6
    steps = [r["step"] for r in rows(run / "metrics.jsonl")]
    assert steps[-1] == 6 and 2 in steps and steps.count(6) == 1


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_whole_job_with_a_clear_error(tmp_path):
    run = tmp_path / "rank-death"
    proc = launch(run, *TINY, "trainer.max_steps=500", "trainer.save_strategy=no")
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists():  # both ranks are training
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    ranks = ranks_of(proc)
    victim = next(p for p in ranks if p.environ().get("LOCAL_RANK") == "1")
    victim.kill()
    killed = time.monotonic()
    proc.wait(timeout=90)
    assert time.monotonic() - killed < 90
    assert proc.returncode == 1
    out = (tmp_path / "rank-death.log").read_text()
    assert "error: training ranks failed" in out and "resume=latest" in out
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert "Traceback (most recent call last)" not in out.split("error: training ranks failed")[-1]
    assert os.path.isdir(run)


@pytest.mark.slow
def test_two_speaker_ranks_ask_the_served_listener_each_question_once(tmp_path):
    # 2 training games over 4 steps on 2 ranks: 8 prompts, each game played on both ranks (learning
    # rate 0 and greedy sampling keep each game's description fixed). Each question is asked once
    # across both ranks: a rank learns the other's answers from the all-gather (twice without it).
    shapes = tmp_path / "shapes"
    with LocalServer(tmp_path, "service=listener", f"lewis.shapes_root={shapes}") as listener:
        run = tmp_path / "speaker"
        overrides = [
            "train=speaker",
            "listener=remote",
            f"listener.port={listener.port}",
            f"lewis.shapes_root={shapes}",
            "dataset.games=4",
            "processes=2",
            "logger=none",
            "trainer.max_steps=4",
            "trainer.learning_rate=0",
            "trainer.temperature=1e-5",
        ]
        finish(launch(run, *overrides), run)
        requests = listener.metric('listener_requests_total{route="/batch_score",status="200"}')
    asked = rows(run / "lewis_predictions.jsonl")  # rank 0's games, with the listener's choices
    assert len(asked) == 4 * 4 and all(r["error"] is None and r["predicted_index"] is not None for r in asked)
    questions = {(r["description"], r["target_index"]) for r in asked}
    assert len(questions) == 2 and requests == len(questions)  # both games reached rank 0; each asked once
