"""GRPO training through run.py: the quickstart learning on SmolLM2, and tiny models (experiment=smoke)
for artefacts, resume, served rewards and sweeps."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import JUDGE_KEY, ROOT, run_cli, run_in_process
from core.serving.local_server import LocalServer

SMOKE = "experiment=smoke"
FAST = [SMOKE, "logger=none", "trainer.max_steps=3", "trainer.save_strategy=no"]


def metrics(run_dir: Path, key: str = "reward/total") -> list[dict]:
    """The rows of ``metrics.jsonl`` that have ``key``: training steps, or held-out evaluations
    (``eval/reward/total``)."""
    return [row for line in (run_dir / "metrics.jsonl").read_text().splitlines() if key in (row := json.loads(line))]


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_policy_learns_a_learnable_reward(tmp_path):
    from safetensors.torch import load_file

    result = run_cli("experiment=learn_digits", "logger=none", f"hydra.run.dir={tmp_path}", "seed=0", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:]
    rewards = [row["reward/total"] for row in metrics(tmp_path)]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 60
    assert end > start + 0.1 and end > 2 * start, (start, end)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: every one moved


@pytest.mark.slow
def test_quickstart_learns_on_smollm2_and_leaves_every_artefact(tmp_path):
    # The quickstart as users run it, cut from 24 to 16 steps to keep the suite short (the README
    # has the full runs and their times): the rise shows by then.
    result = run_cli(
        f"hydra.run.dir={tmp_path}", "trainer.max_steps=16", "trainer.save_steps=8", "trainer.eval_steps=8", timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 17))
    # held-out prompts (the QA set's test split), before training and every 8 steps: the format transfers
    held = metrics(tmp_path, "eval/reward/total")
    assert [r["step"] for r in held] == [0, 8, 16]
    assert held[-1]["eval/reward/format"] >= held[0]["eval/reward/format"] + 0.2, held
    rewards = [r["reward/total"] for r in rows]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end >= start + 0.2, (start, end)
    for key in ("reward/total", "reward/format", "reward/exact_match", "loss", "lr", "samples_per_s"):
        assert rows[-1][key] is not None, key
    assert rows[-1]["reward/total"] == pytest.approx(rows[-1]["reward/format"] + rows[-1]["reward/exact_match"])
    # A real model writes English: mostly letters, digits, spaces and the answer tags.
    texts = [s["completion"] for s in samples(tmp_path)]
    plain = sum(ch.isascii() for t in texts for ch in t) / max(1, sum(len(t) for t in texts))
    assert plain > 0.9 and any("<answer>" in t for t in texts[-8:]), texts[-8:]
    assert (tmp_path / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "config_resolved.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert json.loads((tmp_path / "final.json").read_text())["steps"] == 16
    # the trained adapter against the base model, greedy, on 50 held-out prompts
    summary = run_in_process(tmp_path / "eval", "eval=policy", f"policy_eval.adapter={tmp_path}")
    assert summary["prompts"] == 50 and summary["max_new_tokens"] == 16
    assert summary["scores"]["format"]["trained"] > summary["scores"]["format"]["base"], summary["scores"]


def test_smoke_run_logs_every_reward_component(tmp_path, caplog):
    run_in_process(tmp_path, SMOKE, "logger=none", "trainer.max_steps=2", "trainer.save_strategy=no")
    row = metrics(tmp_path)[-1]
    for key in ("reward/exact_match", "reward/embedding", "reward/llm_judge", "failures/llm_judge/parse_failures"):
        assert row[key] is not None, key
    total = row["reward/exact_match"] + row["reward/embedding"] + row["reward/llm_judge"]
    assert row["reward/total"] == pytest.approx(total, abs=1e-5)
    assert "RANDOM weights" in caplog.text  # the tiny judge says so


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [SMOKE, "logger=none", "reward=exact_match", "trainer.save_steps=2", "trainer.save_total_limit=1"]
    run_in_process(first, *common, "trainer.max_steps=4")
    assert [p.name for p in (first / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]  # older ones removed
    run_in_process(second, *common, "trainer.max_steps=6", f"resume={first}")
    assert [r["step"] for r in metrics(second)] == [5, 6]


def test_cleanup_keeps_only_the_final_adapter(tmp_path):
    run_in_process(
        tmp_path,
        SMOKE,
        "logger=none",
        "reward=exact_match",
        "trainer.max_steps=2",
        "trainer.save_steps=1",
        "checkpoints.cleanup_at_end=true",
    )
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_served_rewards_equal_embedded_rewards(tmp_path):
    # Greedy judging keeps the judge from drawing on the trainer's random stream, so both runs
    # sample the same completions and must score them the same.
    fn = "reward.components.llm_judge.fn"
    same = [*FAST, f"{fn}.mode=text", f"{fn}.prompt_template=default", f"{fn}.temperature=0"]
    same.append("judging.max_new_tokens=8")
    local = tmp_path / "local"
    run_in_process(local, *same)
    with (
        LocalServer(tmp_path, "service=embedding") as emb,
        LocalServer(
            tmp_path, "service=llm_judge", "model=tiny_lm", env={"LLM_JUDGE_SERVER_API_KEY": JUDGE_KEY}
        ) as judge,
    ):
        remote = tmp_path / "remote"
        run_in_process(
            remote,
            *same,
            "judge=remote",
            f"judge.url={judge.url}",
            f"judge.api_key={JUDGE_KEY}",
            "embedder=remote",
            f"embedder.url={emb.url}",
        )
        assert judge.metric("generation_model_calls_total", {"Authorization": f"Bearer {JUDGE_KEY}"}) >= 3
    for a, b in zip(samples(local), samples(remote), strict=True):
        assert a["completion"] == b["completion"]
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-4)
    for a, b in zip(metrics(local), metrics(remote), strict=True):
        assert a["reward/total"] == pytest.approx(b["reward/total"], abs=1e-4)
    assert metrics(remote)[-1]["failures/embedding/requests_failed"] == 0


@pytest.mark.slow
def test_a_reward_server_killed_and_restarted_mid_run_is_picked_up_again(tmp_path):
    server = LocalServer(tmp_path, "service=embedding").start()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            SMOKE,
            "logger=none",
            "reward=embedding",
            "embedder=remote",
            f"embedder.url={server.url}",
            "embedder.timeout=2",
            "trainer.max_steps=20",
            "trainer.save_strategy=no",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").exists() and condition(metrics(run_dir))):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    try:
        wait_for(lambda rows: len(rows) >= 2, "two steps")
        server.proc.send_signal(signal.SIGKILL)
        wait_for(lambda rows: rows[-1]["failures/embedding/requests_failed"] > 0, "a counted failure")
        down_at = len(metrics(run_dir))
        server = LocalServer(tmp_path, "service=embedding", port=server.port).start()  # where the run expects it
        out, _ = proc.communicate(timeout=300)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    rows = metrics(run_dir)
    failed = [r["failures/embedding/requests_failed"] for r in rows]
    assert len(rows) == 20 and failed[0] == 0 and failed[-1] > 0
    assert "falling back to lexical similarity" in out
    # Picked up again: the last steps add no failure, so the server answered them.
    assert len(rows) - failed.index(failed[-1]) >= 4 and failed.index(failed[-1]) >= down_at - 1, failed
    assert all(r["reward/embedding"] > 0 for r in rows)


@pytest.mark.slow
def test_multirun_over_seeds_and_datasets_summarises_each_setting_over_its_seeds(tmp_path):
    result = run_cli(
        "-m",
        "seed=1,2",
        "dataset=synthetic_qa,champ",
        SMOKE,
        "reward=exact_match",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.save_strategy=no",
        # a held-out evaluation at the end of each job (4 prompts of the dataset's test split)
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=2",
        "trainer.per_device_eval_batch_size=4",
        "held_out.limit=4",
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "final.json").exists())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    from core.training.datasets import champ

    trained_on = {json.loads(line)["prompt"] for line in (jobs[1] / "samples.jsonl").read_text().splitlines()}
    assert trained_on <= {row["problem"] for row in champ()["extra_info"]}  # job 1: seed=1 dataset=champ
    with open(tmp_path / "sweep_jobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["setting"] for r in rows} == {"dataset=synthetic_qa", "dataset=champ"}
    assert all(r["held_out_reward"] != "" for r in rows)
    with open(tmp_path / "sweep_summary.csv") as f:
        settings = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(settings) == {"dataset=synthetic_qa", "dataset=champ"}
    assert all(s["seeds"] == "2" for s in settings.values())
    for setting, summary in settings.items():
        finals = [float(r["final_reward"]) for r in rows if r["setting"] == setting]
        held = [float(r["held_out_reward"]) for r in rows if r["setting"] == setting]
        assert float(summary["final_reward_mean"]) == pytest.approx(sum(finals) / 2)
        assert float(summary["final_reward_std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert float(summary["held_out_reward_mean"]) == pytest.approx(sum(held) / 2)
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_deepspeed_configs_leave_the_shared_values_to_the_trainer():
    # Trainer fills "auto" from trainer.*; numbers that differ from TrainingArguments are refused at
    # start (tests/test_ranks_on_cpu.py runs zero3 on two CPU ranks). The reference run's optimizer
    # values live in its experiment.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        zero3 = compose("config", overrides=["deepspeed=zero3", "gpus=4"])
        reference = compose("config", overrides=["train=speaker", "experiment=lewis_speaker_qwen2vl7b"])
    ds = OmegaConf.to_container(zero3.deepspeed.config, resolve=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"} == ds["zero_optimization"]["offload_optimizer"]
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["optimizer"]["params"] == dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto")
    assert ds["bf16"] == {"enabled": "auto"} and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert (reference.trainer.adam_beta2, reference.trainer.weight_decay, reference.trainer.warmup_steps) == (
        0.95,
        0.1,
        100,
    )
    assert reference.deepspeed.config.zero_optimization.stage == 3


def test_layouts_and_launch_commands_without_gpus(tmp_path):
    from core.config_errors import ConfigError
    from core.training.layout import launch_command, layout_for, write_deepspeed_file

    one = layout_for(0)
    assert (one.device, one.num_processes, one.world_size) == ("cpu", 1, 1)
    cpu2 = layout_for(0, None, processes=2)
    assert (cpu2.device, cpu2.backend, cpu2.world_size) == ("cpu", "gloo", 2)
    gpu4 = layout_for(4)
    assert (gpu4.device, gpu4.backend, gpu4.num_processes, gpu4.mixed_precision) == ("cuda", "nccl", 4, "bf16")
    with pytest.raises(ConfigError, match="processes=2 with gpus=4"):
        layout_for(4, None, processes=2)
    with pytest.raises(ConfigError, match="DeepSpeed on the CPU runs on several ranks"):
        layout_for(0, {"zero_optimization": {"stage": 2}})
    ds_file = write_deepspeed_file(layout_for(0, {"zero_optimization": {"stage": 2}}, processes=2), tmp_path)
    assert ds_file is not None and json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 2
    # the same relaunch for 2 GPUs and 2 CPU ranks: torchrun, the same run.py command, one run dir
    for layout, argv in ((layout_for(2), ["run.py", "gpus=2"]), (cpu2, ["run.py", "processes=2"])):
        command = launch_command(layout, [*argv, "hydra.run.dir=old"], tmp_path, env={})
        assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
        assert command[-3:] == [*argv, f"hydra.run.dir={tmp_path}"]
    # two nodes of a SLURM allocation: torchrun's multi-node settings from SLURM's environment
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_JOB_ID": "4242"}
    two_nodes = layout_for(4, None, nodes=2)
    assert two_nodes.world_size == 8
    command = launch_command(two_nodes, ["run.py", "gpus=4"], tmp_path, env=slurm)
    assert command[3:8] == [
        "--nproc_per_node=4",
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=gpu-a",
        "--master_port=24242",
    ]
    with pytest.raises(ConfigError, match="SLURM allocated 3"):
        launch_command(two_nodes, ["run.py"], tmp_path, env={**slurm, "SLURM_NNODES": "3"})
    with pytest.raises(ConfigError, match="needs SLURM's environment"):
        launch_command(two_nodes, ["run.py"], tmp_path, env={})


@pytest.mark.parametrize("override", [[], ["trainer.bf16=false"]], ids=["default", "off"])
def test_cpu_training_uses_bf16_autocast_where_the_cpu_has_it(tmp_path, override):
    # TRL's own default is bf16=True; on a CPU whose oneDNN runs bf16 the recipe keeps it (a
    # SmolLM2 GRPO step 1.1-1.2x faster), elsewhere it trains in fp32. trainer.bf16 decides if set.
    from hydra import compose, initialize_config_dir

    from core.training.grpo import grpo_args
    from core.training.layout import layout_for

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=override)
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert layout_for(0).mixed_precision == ("bf16" if native else "no")
    args = grpo_args(cfg, tmp_path, layout_for(0), [1.0, 1.0], None)
    assert args.bf16 is (native and not override) and args.use_cpu


def test_user_jsonl_and_parquet_load_into_the_standard_columns(tmp_path):
    from datasets import Dataset

    from core.config_errors import ConfigError
    from core.training.datasets import from_files

    rows = [{"question": "Capital of Peru?", "answer": "Lima"}, {"question": "2+2?", "answer": ["4", "four"]}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    Dataset.from_list([{"question": r["question"], "answer": str(r["answer"])} for r in rows]).to_parquet(
        str(tmp_path / "train.parquet")
    )
    jsonl = from_files(str(tmp_path / "train.jsonl"), prompt_key="question", answer_key="answer")
    assert jsonl[0]["prompt"] == [{"role": "user", "content": "Capital of Peru?"}]
    assert jsonl[1]["ground_truth"] == ["4", "four"] and jsonl[0]["extra_info"]["problem"] == "Capital of Peru?"
    parquet = from_files(str(tmp_path / "train.parquet"), prompt_key="question", answer_key="answer", as_chat=False)
    assert parquet[0]["prompt"] == "Capital of Peru?" and parquet[0]["ground_truth"] == ["Lima"]
    with pytest.raises(ConfigError, match="lacks 'prompt'"):
        from_files(str(tmp_path / "train.jsonl"))
    # training from a file: tests/test_math_datasets_on_cpu.py (a verl-format Parquet file)


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_resumes_to_the_same_end(tmp_path):
    common = [SMOKE, "logger=none", "reward=exact_match", "trainer.save_steps=2", "trainer.max_steps=4", "seed=3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_in_process(straight, *common)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *common, f"hydra.run.dir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not ((killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # after step 3: checkpoint-2 is the last one
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = killed / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").exists()
    # What a kill while saving step 4 leaves: the weights written, the trainer state cut short.
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4", dirs_exist_ok=True)
    state = checkpoints / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])

    run_in_process(killed, *common, "resume=latest")

    assert metrics(killed)[-1]["step"] == metrics(straight)[-1]["step"] == 4
    prompts = {run: [(s["step"], s["prompt"]) for s in samples(run) if s["step"] > 2] for run in (straight, killed)}
    assert prompts[killed][-len(prompts[straight]) :] == prompts[straight]  # the same data order after the resume
    saved = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    assert all(json.loads((checkpoints / name / "trainer_state.json").read_text())["global_step"] for name in saved)
