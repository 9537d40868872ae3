"""Hydra launchers for real: a multirun through submitit on a local single-node SLURM cluster."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

CLUSTER = ROOT / "launchers" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Debian's slurm-wlm + munge, installed if needed and started by the repo's script."""
    state = tmp_path_factory.mktemp("slurm")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and starts daemons)")
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"the SLURM daemons could not start here: {(up.stderr or up.stdout)[-500:]}")
    yield {"SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, timeout=60)


def test_multirun_through_submitit_slurm(slurm_cluster, tmp_path):
    result = run_cli(
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.array_parallelism=2",
        "eval=rewards",
        "reward=exact_match",
        "logger=none",
        "evaluation.limit=2,3",
        f"hydra.sweep.dir={tmp_path}",
        env=slurm_cluster,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    scripts = list((tmp_path / ".submitit").glob("*/*_submission.sh"))
    assert scripts and "#SBATCH --partition=debug" in scripts[0].read_text()  # went through sbatch
    assert sorted(
        json.loads((tmp_path / j / "final.json").read_text())["final_reward"] for j in ("0", "1")
    ) == pytest.approx([1 / 3, 0.5])  # first 3 bundled rows hold 1 exact answer; first 2 hold 1
    with open(tmp_path / "sweep_summary.csv") as f:
        assert {r["setting"] for r in csv.DictReader(f)} == {"evaluation.limit=2", "evaluation.limit=3"}


def test_multirun_through_submitit_local(tmp_path):
    result = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "eval=rewards",
        "reward=exact_match",
        "logger=none",
        "evaluation.limit=2,3",
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))  # each job ran in its own submitit process
    assert sorted(
        json.loads((tmp_path / j / "final.json").read_text())["final_reward"] for j in ("0", "1")
    ) == pytest.approx([1 / 3, 0.5])


def test_ray_cluster_launcher_config_composes():
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip('hydra-ray-launcher is an optional extra: pip install -e ".[ray]"')
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=ray_cluster", "gpus=2"], return_hydra_config=True)
    assert cfg.hydra.launcher.ray.remote.num_gpus == 2


@pytest.mark.slow
def test_a_requeued_slurm_training_job_resumes_from_its_latest_checkpoint(slurm_cluster, tmp_path):
    import time

    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.mem_gb=4",
        "hydra.launcher.cpus_per_task=2",
        "hydra.launcher.timeout_min=20",
        "experiment=smoke",
        "logger=none",
        # long enough to outlive the requeue: submitit lets SIGTERM pass, SLURM kills 5 s later
        "trainer.max_steps=20",
        "trainer.save_steps=2",
        "trainer.save_total_limit=3",
        f"hydra.sweep.dir={tmp_path}",
    ]
    sweep = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **slurm_cluster}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    run = tmp_path / "0"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert sweep.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint-2"
        time.sleep(0.5)
    (job,) = [p.name for p in (tmp_path / ".submitit").iterdir() if p.name.isdigit()]
    env = {**os.environ, **slurm_cluster}
    requeue = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True)
    assert requeue.returncode == 0, requeue.stderr
    # SLURM holds a requeued job back for a while (its begin time); here it may start again at once
    for _ in range(120):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
        if state.stdout.strip() == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
            break
        time.sleep(0.5)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out.decode()[-3000:]
    final = json.loads((run / "final.json").read_text())
    assert final["steps"] == 20  # the same end as an uninterrupted run
    log = (run / "run.log").read_text()
    assert "requeued by SLURM (restart 1): resuming from the latest complete checkpoint" in log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 21)) and steps[-1] == 20
    assert steps.count(1) == 1 and steps.count(2) == 1  # went on after checkpoint-2: steps 1-2 never redone
