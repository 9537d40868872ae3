"""Training prompts as a ``datasets.Dataset`` with the columns trainers and rewards read:

* ``prompt``: a chat message list (``[{"role": "user", "content": ...}]``) or a string;
* ``ground_truth``: a list of acceptable answers;
* ``extra_info``: a dict per row (``problem`` at least), passed to the reward functions;
* ``data_source``: where the row comes from.

``synthetic_qa`` writes the bundled set itself, deterministically; ``from_files`` and
``from_hub`` load a user's JSONL/Parquet or a hub dataset into the same columns.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset

from core.config_errors import ConfigError

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


def synthetic_qa(n: int = 300, seed: int = 0, examples: int = 0) -> Dataset:
    """``n`` short questions with checkable answers (arithmetic, capitals, opposites, spelling),
    the same for the same ``seed``; each prompt starts with ``examples`` worked examples (0 to 3)."""
    if not 0 <= examples <= len(EXAMPLES):
        raise ValueError(f"examples must be between 0 and {len(EXAMPLES)}, got {examples}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = ("add", "mul", "capital", "opposite", "letters")[i % 5]
        if kind == "add":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            rows.append(_row(f"What is {a} plus {b}?", [str(a + b)], kind, examples))
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            rows.append(_row(f"What is {a} times {b}?", [str(a * b)], kind, examples))
        elif kind == "capital":
            country = rng.choice(sorted(_CAPITALS))
            rows.append(_row(f"What is the capital of {country}?", [_CAPITALS[country]], kind, examples))
        elif kind == "opposite":
            word = rng.choice(sorted(_OPPOSITES))
            rows.append(_row(f"What is the opposite of '{word}'?", [_OPPOSITES[word]], kind, examples))
        else:
            word = rng.choice(sorted(_CAPITALS.values()))
            rows.append(_row(f"How many letters are in the word '{word}'?", [str(len(word))], kind, examples))
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


def _normalise(rows: list[dict], prompt_key: str, answer_key: str, as_chat: bool, source: str) -> Dataset:
    out = []
    for i, row in enumerate(rows):
        if prompt_key not in row or answer_key not in row:
            raise KeyError(f"row {i} of {source} lacks '{prompt_key}' or '{answer_key}' (has {sorted(row)})")
        prompt, answer = row[prompt_key], row[answer_key]
        if isinstance(prompt, str) and as_chat:
            prompt = [{"role": "user", "content": prompt}]
        extra = dict(row.get("extra_info") or {})
        extra.setdefault("problem", prompt if isinstance(prompt, str) else prompt[-1]["content"])
        out.append(
            {
                "prompt": prompt,
                "ground_truth": [answer] if isinstance(answer, str) else [str(a) for a in answer],
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
) -> Dataset:
    """Rows of a ``.jsonl``/``.json`` or ``.parquet`` file, mapped to the standard columns."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(
            f"dataset file {file} does not exist (dataset.path): give an existing .jsonl, .json or .parquet"
        )
    kind = "parquet" if file.suffix == ".parquet" else "json"
    rows = Dataset.from_parquet(str(file)) if kind == "parquet" else Dataset.from_json(str(file))
    rows = rows.to_list()[:limit] if limit else rows.to_list()
    return _normalise(rows, prompt_key, answer_key, as_chat, file.name)


def from_hub(
    name: str,
    split: str = "train",
    prompt_key: str = "question",
    answer_key: str = "answer",
    as_chat: bool = True,
    limit: int | None = None,
) -> Dataset:
    """A dataset from the Hugging Face hub (or a local ``datasets`` folder), mapped to the standard columns."""
    from datasets import load_dataset

    rows = load_dataset(name, split=split)
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    return _normalise(rows.to_list(), prompt_key, answer_key, as_chat, name)
