"""Training prompts as a ``datasets.Dataset`` with the columns trainers and rewards read:

* ``prompt``: a chat message list (``[{"role": "user", "content": ...}]``) or a string;
* ``ground_truth``: a list of acceptable answers;
* ``extra_info``: a dict per row (``problem`` at least), passed to the reward functions;
* ``data_source``: where the row comes from.

``synthetic_qa`` writes the bundled set itself, deterministically; ``from_files`` and
``from_hub`` load a user's JSONL/Parquet or a hub dataset into the same columns.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import OmegaConf

from core.config_errors import ConfigError
from core.rewards.answers import check_extraction, extract_answer
from core.rewards.base import references

INSTRUCTION = "Answer briefly, inside <answer></answer>."

_CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Sweden": "Stockholm",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Ghana": "Accra",
}
_OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "early": "late",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "fast": "slow",
    "high": "low",
    "wet": "dry",
    "old": "new",
    "hard": "soft",
    "loud": "quiet",
}


# Worked examples shown as earlier chat turns: small instruct models copy a format they have seen
# far more reliably than one they are only told about.
EXAMPLES = (
    ("What is the capital of Italy?", "Rome"),
    ("What is 2 plus 3?", "5"),
    ("What is the opposite of 'big'?", "small"),
)


def _row(question: str, answers: list[str], kind: str, examples: int = 0) -> dict:
    # The instruction is said once, as the system message (it also replaces a chat template's
    # default system prompt): every prompt token costs a forward and backward pass per step.
    prompt = [{"role": "system", "content": INSTRUCTION}]
    for q, a in EXAMPLES[:examples]:
        prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": f"<answer>{a}</answer>"}]
    return {
        "prompt": [*prompt, {"role": "user", "content": question}],
        "ground_truth": answers,
        "extra_info": {"problem": question},
        "data_source": f"synthetic_qa/{kind}",
    }


KINDS = ("add", "mul", "capital", "opposite", "letters")
HELD_OUT_FRACTION = 0.2


@cache
def _questions(kind: str, split: str) -> list[tuple[str, str]]:
    """Every (question, answer) of a kind, in its split: a fixed fifth of each kind's questions
    (drawn once, whatever the dataset's seed) is the test split, never seen in training."""
    if kind == "add":
        pool = [(f"What is {a} plus {b}?", str(a + b)) for a in range(1, 51) for b in range(1, 51)]
    elif kind == "mul":
        pool = [(f"What is {a} times {b}?", str(a * b)) for a in range(2, 13) for b in range(2, 13)]
    elif kind == "capital":
        pool = [(f"What is the capital of {c}?", city) for c, city in sorted(_CAPITALS.items())]
    elif kind == "opposite":
        pool = [(f"What is the opposite of '{w}'?", o) for w, o in sorted(_OPPOSITES.items())]
    else:
        pool = [(f"How many letters are in the word '{w}'?", str(len(w))) for w in sorted(_CAPITALS.values())]
    random.Random(0).shuffle(pool)
    held_out = math.ceil(len(pool) * HELD_OUT_FRACTION)
    return pool[:held_out] if split == "test" else pool[held_out:]


def synthetic_qa(n: int = 300, seed: int = 0, examples: int = 0, split: str = "train") -> Dataset:
    """``n`` short questions with checkable answers (arithmetic, capitals, opposites, spelling),
    the same for the same ``seed``; each prompt starts with ``examples`` worked examples (0 to 3).
    ``split=test`` draws from the held-out fifth of each kind's questions (see ``_questions``)."""
    if not 0 <= examples <= len(EXAMPLES):
        raise ValueError(f"examples must be between 0 and {len(EXAMPLES)}, got {examples}")
    if split not in ("train", "test"):
        raise ConfigError(f"dataset.split must be train or test, got {split!r}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        question, answer = rng.choice(_questions(kind, split))
        rows.append(_row(question, [answer], kind, examples))
    return Dataset.from_list(rows)


def repeated_prompt(text: str = "Say a number.", n: int = 256) -> Dataset:
    """One prompt ``n`` times, with no reference (for rewards that need none)."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": text}],
                "ground_truth": [],
                "extra_info": {"problem": text},
                "data_source": "repeated_prompt",
            }
        ]
        * n
    )


def _lookup(row: Mapping, key: str):
    """``row[key]``, where a dotted key reads into nested mappings (``reward_model.ground_truth``);
    ``KeyError`` when a part is missing."""
    value = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _answer_of(row: Mapping, answer_key: str):
    # verl's schema (its preprocessing scripts' rows) keeps the answer in reward_model.ground_truth
    if answer_key == "ground_truth" and "ground_truth" not in row and isinstance(row.get("reward_model"), Mapping):
        answer_key = "reward_model.ground_truth"
    return _lookup(row, answer_key)


def _normalise(
    rows: list[dict], prompt_key: str, answer_key: str, as_chat: bool, source: str, answer_extract: str = "none"
) -> Dataset:
    check_extraction(answer_extract)
    out = []
    for i, row in enumerate(rows):
        try:
            prompt, answer = _lookup(row, prompt_key), _answer_of(row, answer_key)
        except KeyError:
            raise ConfigError(
                f"row {i} of {source} lacks '{prompt_key}' or '{answer_key}' (it has {sorted(row)}): set "
                "dataset.prompt_key and dataset.answer_key (dotted for nested keys: reward_model.ground_truth)"
            ) from None
        refs = [extract_answer(ref, answer_extract).strip() for ref in references(answer)]
        if not refs and (isinstance(answer, Mapping | str) or answer is None):  # an empty list says "no reference"
            raise ConfigError(
                f"row {i} of {source}: '{answer_key}' holds no answer string ({str(answer)[:80]!r}; the row has "
                f"{sorted(row)}): point dataset.answer_key at a string, a list of strings, or a mapping with one "
                "under ground_truth, target, solution, answer or answers"
            )
        if isinstance(prompt, str) and as_chat:
            prompt = [{"role": "user", "content": prompt}]
        elif hasattr(prompt, "tolist"):  # a message list read from Parquet can come as an array
            prompt = prompt.tolist()
        extra = dict(row.get("extra_info") or {})
        extra.setdefault("problem", prompt if isinstance(prompt, str) else prompt[-1]["content"])
        out.append(
            {
                "prompt": prompt,
                "ground_truth": refs,
                "extra_info": extra,
                "data_source": str(row.get("data_source", source)),
            }
        )
    return Dataset.from_list(out)


def from_files(
    path: str,
    prompt_key: str = "prompt",
    answer_key: str = "ground_truth",
    as_chat: bool = True,
    limit: int | None = None,
    answer_extract: str = "none",
) -> Dataset:
    """Rows of a ``.jsonl``/``.json`` or ``.parquet`` file, mapped to the standard columns.

    Rows in verl's schema (``prompt`` messages, ``reward_model: {style, ground_truth}``,
    ``data_source``, ``extra_info``) map as they are; ``answer_extract`` takes the final answer out
    of each reference (``gsm8k``: after ``####``; ``boxed``; ``tags``; ``none``)."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(
            f"dataset file {file} does not exist (dataset.path): give an existing .jsonl, .json or .parquet"
        )
    kind = "parquet" if file.suffix == ".parquet" else "json"
    rows = Dataset.from_parquet(str(file)) if kind == "parquet" else Dataset.from_json(str(file))
    rows = rows.to_list()[:limit] if limit else rows.to_list()
    return _normalise(rows, prompt_key, answer_key, as_chat, file.name, answer_extract)


def from_hub(
    name: str,
    split: str = "train",
    prompt_key: str = "question",
    answer_key: str = "answer",
    as_chat: bool = True,
    limit: int | None = None,
    answer_extract: str = "none",
    config: str | None = None,
    instruction: str | None = None,
) -> Dataset:
    """A dataset from the Hugging Face hub (or a local ``datasets`` folder), mapped to the standard
    columns (``answer_extract`` as for ``from_files``; ``config``: the dataset's subset, e.g. ``main``;
    ``instruction``: appended to each string prompt after a space, as verl's preprocessing does)."""
    from datasets import load_dataset

    rows = load_dataset(name, config, split=split)
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    rows = rows.to_list()
    if instruction:
        rows = [
            {**r, prompt_key: f"{r[prompt_key]} {instruction}"} if isinstance(r.get(prompt_key), str) else r
            for r in rows
        ]
    return _normalise(rows, prompt_key, answer_key, as_chat, name, answer_extract)


def champ(split: str = "train", test_size: int = 70, seed: int = 0, instruction: str = INSTRUCTION) -> Dataset:
    """CHAMP's 270 competition math problems with final answers (the ``champ-dataset`` wheel), as a
    ``train`` or ``test`` split: ``test_size`` problems drawn by ``seed``, the same in every run,
    and the rest. ``instruction`` is the system message."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset=champ needs the champ-dataset package: pip install champ-dataset==1.0.0")
    data = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / "v0.json"
    problems = sorted(json.loads(data.read_text())["problems"].values(), key=lambda p: p["identifier"])
    if split not in ("train", "test") or not 0 < test_size < len(problems):
        raise ConfigError(f"dataset=champ: split must be train or test and 0 < test_size < {len(problems)}")
    held_out = set(random.Random(seed).sample(range(len(problems)), test_size))
    rows = [
        {
            "prompt": [{"role": "system", "content": instruction}, {"role": "user", "content": p["_text"]}],
            "ground_truth": [p["_answer"]],
            "extra_info": {"problem": p["_text"], "identifier": p["identifier"], "category": p["category"]},
            "data_source": f"champ/{p['category']}",
        }
        for i, p in enumerate(problems)
        if (i in held_out) == (split == "test")
    ]
    return Dataset.from_list(rows)


def held_out_dataset(cfg):
    """The prompts TRL's evaluation loop scores during training (the ``held_out:`` node): the file
    at ``held_out.path`` read as the training dataset's files are, else the training dataset's own
    ``held_out.split``; ``None`` when it has neither. The first ``held_out.limit`` rows."""
    node = cfg.get("held_out") or {}
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if node.get("path"):
        if "path" not in dataset:
            raise ConfigError(
                "held_out.path is a file of held-out prompts for dataset=files; this dataset has its own "
                "held-out split (held_out.split), so leave held_out.path null"
            )
        dataset["path"] = str(node["path"])
    elif "split" in dataset:
        dataset["split"] = node.get("split") or "test"
    else:
        return None
    rows = instantiate(dataset)
    limit = node.get("limit")
    return rows.select(range(min(int(limit), len(rows)))) if limit else rows
