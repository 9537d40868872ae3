"""``dataset=easy_vqa``: referential games on the real images of easy-VQA (MIT; the ``easy-vqa``
wheel: 4,000 train and 1,000 test 64×64 PNGs, one shape in one of 8 colours each).

The wheel has no labels per image, only question–answer pairs; each image's shape and colour
follow from them ("what is the blue shape?" → rectangle; "is there not a red shape?" → no, so
red). Images whose answers leave the shape or the colour open (about a tenth) are left out.

Train games are built from train images and test games from test images (easy-VQA's own split):
a target and ``distractors`` images that differ from it in shape, colour or both, with the
ground-truth description ("a blue rectangle"). The images used are copied under ``root`` (the
folder ``lewis.image_roots`` allows), next to ``games_<split>.jsonl`` in the layout
``dataset=folder`` reads, so served players accept the games' paths.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

from lewis.data import load_games

log = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SPLITS = ("train", "test")
_NEGATIONS = {"not", "no"}


def package_data() -> Path:
    """The ``easy_vqa/data`` folder of the installed wheel (read as files, not through its helpers)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("dataset=easy_vqa needs the easy-vqa wheel: pip install easy-vqa==1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def image_labels(questions: list) -> dict[int, tuple[str, str]]:
    """``{image id: (shape, colour)}`` for the images whose ``[question, answer, image id]``
    triples fix both: an answered attribute is present, as is every attribute a ``what ...``
    question names; a yes/no answer (flipped by ``not``/``no``) says which named ones are
    present or absent, and absent ones rule values out."""
    present, absent = defaultdict(set), defaultdict(set)
    values = set(SHAPES) | set(COLOURS)
    for question, answer, image in questions:
        named = set(re.findall(r"\w+", question)) & values
        if answer not in ("yes", "no"):
            present[image] |= named | {answer}
        else:
            holds = (answer == "yes") != bool(set(re.findall(r"\w+", question)) & _NEGATIONS)
            (present if holds else absent)[image] |= named
    labels = {}
    for image in {q[2] for q in questions}:
        shape = _one(SHAPES, present[image], absent[image])
        colour = _one(COLOURS, present[image], absent[image])
        if shape and colour:
            labels[image] = (shape, colour)
    return labels


def _one(choices: tuple[str, ...], present: set, absent: set) -> str | None:
    found = [c for c in choices if c in present] or [c for c in choices if c not in absent]
    return found[0] if len(found) == 1 else None


def describe(shape: str, colour: str) -> str:
    """The ground-truth description of an easy-VQA image."""
    return f"a {colour} {shape}"


def make_games(labels: dict[int, tuple[str, str]], games: int, distractors: int, rng: random.Random) -> list[dict]:
    """``games`` games over the labelled images: each target (drawn without repetition while
    images last) with ``distractors`` images whose (shape, colour) differ from it and from each
    other; each distractor changes the shape, the colour or both, chosen at random."""
    by_label = defaultdict(list)
    for image, label in sorted(labels.items()):
        by_label[label].append(image)
    targets = sorted(labels)
    rng.shuffle(targets)
    out = []
    for g in range(games):
        target = targets[g % len(targets)]
        shape, colour = labels[target]
        used, chosen = {(shape, colour)}, []
        while len(chosen) < distractors:
            change = rng.choice(("shape", "colour", "both"))
            label = (
                rng.choice([s for s in SHAPES if s != shape]) if change != "colour" else shape,
                rng.choice([c for c in COLOURS if c != colour]) if change != "shape" else colour,
            )
            if label in used or not by_label[label]:
                continue
            used.add(label)
            chosen.append(rng.choice(by_label[label]))
        candidates = [target, *chosen]
        rng.shuffle(candidates)
        out.append(
            {
                "target": target,
                "candidates": candidates,
                "target_index": candidates.index(target),
                "description": describe(shape, colour),
                "attributes": {"shape": shape, "colour": colour},
            }
        )
    return out


def write_split(root: Path, split: str, games: int, distractors: int, seed: int) -> None:
    """Copy the images of ``split``'s games under ``root/images`` and write ``games_<split>.jsonl``."""
    data = package_data() / split
    questions = json.loads((data / "questions.json").read_text())
    labels = image_labels(questions)
    rng = random.Random(f"{seed}-{split}")
    rows = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n, game in enumerate(make_games(labels, games, distractors, rng)):
        paths = []
        for image in game.pop("candidates"):
            rel = f"images/{split}_{image}.png"
            if not (root / rel).exists():
                shutil.copyfile(data / "images" / f"{image}.png", root / rel)
            paths.append(rel)
        game.pop("target")
        rows.append({"id": f"easy_vqa-{split}-{seed}-{n}", "candidates": paths, **game})
    (root / f"games_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def easy_vqa(root: str, games: int = 2000, test_games: int = 200, distractors: int = 3, seed: int = 0, split="train"):
    """``dataset=easy_vqa``: the games of ``split`` (``train`` or ``test``), written under ``root``
    on first use (and again when the settings change)."""
    if split not in SPLITS:
        raise ValueError(f"dataset=easy_vqa has splits {SPLITS}, not {split!r}")
    root_path = Path(root)
    marker = root_path / "DONE"
    wanted = {"games": games, "test_games": test_games, "distractors": distractors, "seed": seed}
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        log.info("writing the easy-VQA games in %s", root)
        for name, count in (("train", games), ("test", test_games)):
            write_split(root_path, name, count, distractors, seed)
        marker.write_text(json.dumps(wanted))
    return load_games(root_path, split)
