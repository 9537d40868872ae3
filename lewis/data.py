"""Referential-game data: a deterministic synthetic shapes set, or a user's folder, one interface.

A game is ``{id, candidates: [image paths], target_index, description, attributes}``: the
speaker sees ``candidates[target_index]``; the listener must find it among the candidates from the
description. Each distractor differs from the target in one or more of colour, shape, size,
position and count, so a description has to name what tells them apart.

Folder layout (written by ``make_shapes``, read by ``load_games`` for any folder laid out so)::

    <root>/images/*.png
    <root>/games_train.jsonl, games_val.jsonl, games_test.jsonl   (candidates relative to <root>)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.3}
POSITIONS = {"left": 0.27, "center": 0.5, "right": 0.73}
COUNTS = {1: "one", 2: "two", 3: "three"}
ATTRIBUTES = ("colour", "shape", "size", "position", "count")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    colour: str
    shape: str
    size: str
    position: str
    count: int

    def describe(self) -> str:
        """The ground-truth description, one sentence naming every attribute."""
        noun = self.shape + ("s" if self.count > 1 else "")
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"{COUNTS[self.count].capitalize()} {self.size} {self.colour} {noun} {where}."

    def key(self) -> str:
        return f"{self.count}-{self.size}-{self.colour}-{self.shape}-{self.position}"


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` on a light background (shapes stacked vertically when count > 1)."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    radius = SIZES[scene.size] * size / 2
    cx = POSITIONS[scene.position] * size
    rows = np.linspace(0.5, 0.5, 1) if scene.count == 1 else np.linspace(0.25, 0.75, scene.count)
    for fy in rows:
        cy = fy * size
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return img


def _random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(list(COLOURS)),
        rng.choice(SHAPES),
        rng.choice(list(SIZES)),
        rng.choice(list(POSITIONS)),
        rng.choice(list(COUNTS)),
    )


def _distractor(target: Scene, rng: random.Random) -> Scene:
    """A scene that differs from ``target`` in 1 to 3 attributes."""
    changed = rng.sample(ATTRIBUTES, rng.randint(1, 3))
    values = {
        "colour": [c for c in COLOURS if c != target.colour],
        "shape": [s for s in SHAPES if s != target.shape],
        "size": [s for s in SIZES if s != target.size],
        "position": [p for p in POSITIONS if p != target.position],
        "count": [c for c in COUNTS if c != target.count],
    }
    fields = {a: getattr(target, a) for a in ATTRIBUTES}
    fields.update({a: rng.choice(values[a]) for a in changed})
    return Scene(**fields)


def make_shapes(root: str | Path, games: int = 60, distractors: int = 3, seed: int = 0, image_size: int = 64) -> Path:
    """Write the shapes set (images + split files) under ``root``; the same arguments give the same files."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for g in range(games):
        target = _random_scene(rng)
        others: list[Scene] = []
        while len(others) < distractors:
            d = _distractor(target, rng)
            if d != target and d not in others:
                others.append(d)
        scenes = [target, *others]
        rng.shuffle(scenes)
        paths = []
        for scene in scenes:
            rel = f"images/{scene.key()}.png"
            if not (root / rel).exists():
                render(scene, image_size).save(root / rel)
            paths.append(rel)
        index = scenes.index(target)
        rows.append(
            {
                "id": f"shapes-{seed}-{g}",
                "candidates": paths,
                "target_index": index,
                "description": target.describe(),
                "attributes": {a: getattr(target, a) for a in ATTRIBUTES},
            }
        )
    n_val = n_test = max(1, games // 10)
    splits = {"val": rows[:n_val], "test": rows[n_val : n_val + n_test], "train": rows[n_val + n_test :]}
    for split, part in splits.items():
        (root / f"games_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "DONE").write_text(json.dumps({"games": games, "distractors": distractors, "seed": seed}))
    return root


def shapes(root: str, games: int = 60, distractors: int = 3, seed: int = 0, image_size: int = 64, split="train"):
    """``dataset=shapes``: the games of ``split``, generating the set under ``root`` first if needed."""
    marker = Path(root) / "DONE"
    wanted = {"games": games, "distractors": distractors, "seed": seed}
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        log.info("generating the shapes game set in %s", root)
        make_shapes(root, games, distractors, seed, image_size)
    return load_games(root, split)


def load_games(root: str | Path, split: str = "train") -> list[dict]:
    """``dataset=folder``: the games of ``split`` under ``root``, with absolute, checked image paths."""
    root = Path(root).expanduser().resolve()
    path = root / f"games_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a game folder holds images and games_<split>.jsonl")
    games = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        game = json.loads(line)
        missing = [k for k in ("candidates", "target_index", "description") if k not in game]
        if missing or not 0 <= int(game["target_index"]) < len(game["candidates"]):
            raise ValueError(f"{path}:{n + 1}: a game needs candidates, a target_index among them and a description")
        game["candidates"] = [str((root / c).resolve()) for c in game["candidates"]]
        for c in game["candidates"]:
            if not Path(c).is_file():
                raise FileNotFoundError(f"{path}:{n + 1}: image {c} not found")
        game.setdefault("id", f"{split}-{n}")
        games.append(game)
    return games
