"""``train=lewis_game`` (``experiment=lewis_cpu``): the whole Lewis game, as the commands a user
would type, one after the other, each in a folder of this run:

1. ``listener_warmup/``: ``train=listener_warmup`` (the listener learns to see);
2. ``speaker_warmup/``: ``train=speaker_warmup`` (the speaker learns the tagged format, with
   ``warmup.omit`` leaving room for GRPO), from the listener's weights when
   ``game.speaker_from_listener`` (both players then share what the listener learned to see, as
   Lewis-game agents usually share a pretrained vision encoder), scored by the warmed-up listener;
3. ``speaker/``: ``train=speaker`` from the speaker's warm-up, against the warmed-up listener,
   embedded (``game.listener=local``) or served (``remote``: ``service=listener`` beside it);
4. the GRPO speaker's descriptions of the test targets, as stage 2 reported the warm-up's.

Each stage is ``python run.py`` with this job's model and dataset choices, its own overrides
(``game.<stage>``) and the user's; ``game.json`` sums them up. A stage whose result file is
there already is not run again, so a pipeline stopped halfway continues where it was.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from core.config_errors import JobFailed, check_writable_dir
from core.serving.local_server import ROOT, LocalServer
from lewis.warmup import evaluate_speaker

log = logging.getLogger(__name__)

# What each stage leaves when it finished.
RESULTS = {"listener_warmup": "listener_warmup.json", "speaker_warmup": "speaker_warmup.json", "speaker": "final.json"}
# Groups whose choice every stage shares (the user's own overrides pass through as they are).
SHARED_GROUPS = ("vlm", "dataset")


def _forwarded() -> list[str]:
    """This job's group choices and command-line overrides, without what picks this task."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    own = ("train=", "experiment=", "hydra.", "paths.", "game.", "+game.")
    own += tuple(f"{g}=" for g in SHARED_GROUPS)  # passed on as chosen, once
    choices = [f"{g}={hc.runtime.choices[g]}" for g in SHARED_GROUPS if hc.runtime.choices.get(g)]
    return choices + [o for o in hc.overrides.task if not o.startswith(own)]


def _run_stage(name: str, folder: Path, overrides: list[str]) -> dict:
    done = folder / RESULTS[name]
    if done.is_file():
        log.info("stage %s: done before (%s)", name, done)
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        *overrides,
        f"paths.output_dir={folder}",
        f"hydra.run.dir={folder}",
    ]
    log.info("stage %s: %s", name, " ".join(command[1:]))
    started = time.perf_counter()
    with open(folder / "stage.log", "w") as out:
        status = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0 or not done.is_file():
        raise JobFailed(f"stage {name} failed (exit status {status}); its log is {folder / 'stage.log'}")
    log.info("stage %s: %.0f s", name, time.perf_counter() - started)
    return json.loads(done.read_text())


def run_game(cfg) -> dict:
    """Entry point of ``python run.py train=lewis_game`` (``experiment=lewis_cpu``)."""
    run_dir = check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    game = OmegaConf.to_container(cfg.game, resolve=True)
    shared = _forwarded()
    listener_ck = run_dir / "listener_warmup" / "checkpoint"
    speaker_ck = run_dir / "speaker_warmup" / "checkpoint"
    players = [f"lewis.listener_checkpoint={listener_ck}", f"lewis.speaker_checkpoint={speaker_ck}"]
    started, summary = time.perf_counter(), {}

    result = _run_stage(
        "listener_warmup", run_dir / "listener_warmup", ["train=listener_warmup", *shared, *game["listener_warmup"]]
    )
    summary["listener"] = {k: result[k] for k in ("test_accuracy", "chance", "test_games", "train_seconds")}
    speaker = ["train=speaker_warmup", *shared, *game["speaker_warmup"], players[0]]
    if game["speaker_from_listener"]:
        speaker.append(f"warmup.start_from={listener_ck}")
    result = _run_stage("speaker_warmup", run_dir / "speaker_warmup", speaker)
    summary["speaker_warmup"] = {k: result[k] for k in ("test", "train_seconds")}

    grpo = ["train=speaker", *shared, *game["speaker"], *players]
    pairs = int(game["listener_batch_size"])
    if game["listener"] == "remote":
        served = LocalServer(
            run_dir / "listener_service", "service=listener", *shared, players[0], f"engine.batch_size={pairs}"
        )
        with served:
            _run_stage(
                "speaker", run_dir / "speaker", [*grpo, "listener=remote", f"listener.url={served.url}/batch_score"]
            )
    else:
        _run_stage("speaker", run_dir / "speaker", [*grpo, f"listener.batch_size={pairs}"])
    summary["speaker_grpo"] = grpo_accuracy(run_dir / "speaker" / "metrics.jsonl")
    adapter = str(run_dir / "speaker" / "adapter")
    summary["speaker_after_grpo"] = evaluate_speaker(
        cfg, adapter, str(listener_ck), cfg.game.eval_games, cfg.game.temperature
    )
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / "game.json").write_text(json.dumps(summary, indent=2))
    log.info("Lewis game: %s", json.dumps({k: v for k, v in summary.items() if k != "speaker_warmup"}))
    return summary


def grpo_accuracy(metrics: Path, window: int = 5) -> dict:
    """The listener-accuracy reward of the first and last ``window`` GRPO steps (``metrics.jsonl``)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    accuracy = [r["reward/accuracy"] for r in rows if "reward/accuracy" in r]
    if not accuracy:
        raise JobFailed(f"{metrics} has no reward/accuracy rows")
    first, last = accuracy[:window], accuracy[-window:]
    return {
        "steps": len(accuracy),
        "first": sum(first) / len(first),
        "last": sum(last) / len(last),
        "curve": accuracy,
    }
