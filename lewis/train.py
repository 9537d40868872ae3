"""``train=speaker`` and ``train=listener``: GRPO + LoRA on one player, the other frozen.

Speaker: each game's target image is the prompt; completions are tagged descriptions; the
reward mix (``reward=lewis_speaker``) asks the listener (``listener=local|remote``) to find the
target among the candidates from the description, and adds the format and length rewards.
Listener: the prompt shows all candidates and a description (``speaker=ground_truth|local|remote``);
the completion names an image by number (``reward=lewis_listener``). Both run on
``core.training.grpo.train`` (checkpoints, metrics, tracker, adapter, DeepSpeed/accelerate layout).
"""

from __future__ import annotations

import logging

from datasets import Dataset
from hydra.utils import instantiate

from core.models.loading import device_for
from core.training.grpo import train
from lewis.engines import SPEAKER_PROMPT
from lewis.images import read_image
from lewis.protocols import Speaker
from lewis.rewards import spoken_description
from lewis.vlm import build_vlm, load_processor

log = logging.getLogger(__name__)

LISTENER_PROMPT = "Description: {description}\nWhich image matches the description? Answer with its number (1-{n})."


def _user(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def speaker_rows(games: list[dict], prompt: str = SPEAKER_PROMPT) -> Dataset:
    """One row per game: the target image, the instruction, the game in ``extra_info``."""
    rows = {"prompt": [], "image": [], "ground_truth": [], "extra_info": []}
    for g in games:
        target = g["candidates"][g["target_index"]]
        rows["prompt"].append(_user(1, prompt))
        rows["image"].append(read_image(target))
        rows["ground_truth"].append(g["description"])
        rows["extra_info"].append({"candidates": g["candidates"], "target_index": g["target_index"], "id": g["id"]})
    return Dataset.from_dict(rows)


def listener_rows(games: list[dict], descriptions: list[str]) -> Dataset:
    """One row per game: every candidate image and the description to match."""
    rows = {"prompt": [], "images": [], "ground_truth": [], "extra_info": []}
    for g, description in zip(games, descriptions, strict=True):
        n = len(g["candidates"])
        rows["prompt"].append(_user(n, LISTENER_PROMPT.format(description=description, n=n)))
        rows["images"].append([read_image(c) for c in g["candidates"]])
        rows["ground_truth"].append(str(g["target_index"] + 1))
        rows["extra_info"].append({"candidates": g["candidates"], "target_index": g["target_index"], "id": g["id"]})
    return Dataset.from_dict(rows)


def descriptions_for(games: list[dict], speaker: Speaker | None) -> list[str]:
    """What the listener is trained on: ground truth (``speaker`` None) or the speaker's descriptions."""
    if speaker is None:
        return [g["description"] for g in games]
    batch = [{"image_path": g["candidates"][g["target_index"]]} for g in games]
    return [spoken_description(r["text"]) for r in speaker.batch_describe(batch)["results"]]


def _policy(cfg, checkpoint: str | None):
    """The player GRPO trains: ``cfg.vlm``, or a warm-up's checkpoint of it."""
    processor = load_processor(cfg.vlm)
    return build_vlm(cfg.vlm, processor, device_for(int(cfg.gpus)), checkpoint), processor


def run_speaker(cfg) -> dict:
    """Entry point of ``python run.py train=speaker [listener=remote]``."""

    def build():
        model, processor = _policy(cfg, cfg.lewis.get("speaker_checkpoint"))
        return model, processor, speaker_rows(instantiate(cfg.dataset)), instantiate(cfg.reward)

    return train(cfg, build)


def run_listener(cfg) -> dict:
    """Entry point of ``python run.py train=listener [speaker=local|remote]``."""

    def build():
        games = instantiate(cfg.dataset)
        speaker = instantiate(cfg.speaker) if cfg.get("speaker") else None
        rows = listener_rows(games, descriptions_for(games, speaker))
        model, processor = _policy(cfg, cfg.lewis.get("listener_checkpoint"))
        return model, processor, rows, instantiate(cfg.reward)

    return train(cfg, build)
