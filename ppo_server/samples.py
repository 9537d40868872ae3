"""Training samples for the policy and value servers: where they may come from and what they mean.

A sample is the reference policy server's ``(question, context, current_node, value)``: the prompt is the question
(as a user turn) followed by the reasoning so far (``context``), the response is the step
``current_node``, and ``value`` its value (the value server's target; the policy's advantage
unless a ``GAE`` field gives one). The reference's chat form is accepted as well:
``{"messages": [..., {"role": "assistant", "content": step}], "value" | "GAE": x}``.

Samples come inline or from ``dataset_path``, which must resolve under one of the configured
dataset roots (else 403), read by a loader named from ``LOADERS`` (else 400): a request never
names a class or module to import.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.serving.paths import is_file, real_roots, resolve_under


@dataclass(frozen=True)
class Sample:
    """One training example, already split into the text before and after the trained step."""

    messages: tuple[tuple[str, str], ...]  # (role, content) of the prompt conversation
    context: str  # the assistant's text so far, continued by ``response``
    response: str
    value: float
    advantage: float


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data.get("samples", data.get("dataset")) if isinstance(data, dict) else data


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# The loaders a request may name in ``dataset_loader_class``; add yours here.
LOADERS: dict[str, Callable[[Path], list]] = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


def resolve_dataset_path(path: str, roots: Sequence[str | Path]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots`` (symlinks resolved), else 403."""
    if not roots:
        raise PermissionError("dataset_path is disabled: no dataset roots are configured on this server")
    real = resolve_under(path, real_roots(roots), "dataset_path", "dataset")
    if not is_file(real, "dataset_path"):
        raise ValueError(f"dataset_path {path!r} is not a file")
    return real


def check_loader(name: str | None) -> str | None:
    """``name`` if it is a registered loader (or None), else 400 listing the registered ones."""
    if name is not None and name not in LOADERS:
        raise ValueError(f"unknown dataset_loader_class {name!r}; registered loaders: {', '.join(sorted(LOADERS))}")
    return name


def load_rows(path: Path, loader: str | None) -> list:
    """Rows of a dataset file, read by the registered loader ``loader`` (default: by file suffix)."""
    name = check_loader(loader or _BY_SUFFIX.get(path.suffix))
    try:
        rows = LOADERS[name](path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path.name} with loader {name!r}: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path.name} does not hold a list of samples")
    return rows


def _number(row: Mapping, key: str, index: int) -> float:
    try:
        x = float(row[key])
    except (TypeError, ValueError):
        raise ValueError(f"sample {index}: {key!r} must be a number, got {row[key]!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"sample {index}: {key!r} must be finite")
    return x


def parse_sample(row, index: int) -> Sample:
    """A ``Sample`` from one row in either accepted form; a clear 400 naming the row otherwise."""
    if not isinstance(row, Mapping):
        raise ValueError(f"sample {index} must be an object, got {type(row).__name__}")
    value_key = next((k for k in ("value", "GAE") if row.get(k) is not None), None)
    if value_key is None:
        raise ValueError(f"sample {index} needs a 'value' (or 'GAE')")
    value = _number(row, value_key, index)
    advantage = _number(row, "GAE", index) if row.get("GAE") is not None else value
    if row.get("messages") is not None:
        messages = row["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok or messages[-1]["role"] != "assistant":
            raise ValueError(f"sample {index}: 'messages' must be role/content objects ending with the assistant")
        prompt = tuple((m["role"], m["content"]) for m in messages[:-1])
        return Sample(prompt, "", messages[-1]["content"], value, advantage)
    for key in ("question", "current_node"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"sample {index}: {key!r} must be a string")
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise ValueError(f"sample {index}: 'context' must be a string")
    return Sample((("user", row["question"]),), context, row["current_node"], value, advantage)


def collect_samples(
    dataset: list | None,
    dataset_path: str | None,
    loader: str | None,
    roots: Sequence[str | Path],
    percent_of_data: float,
    seed: int = 0,
) -> list[Sample]:
    """Parsed samples from the inline ``dataset`` or the file, subsampled to ``percent_of_data``."""
    check_loader(loader)
    if dataset is None and dataset_path is None:
        raise ValueError("give 'dataset' (a list of samples) or 'dataset_path'")
    rows = dataset if dataset is not None else load_rows(resolve_dataset_path(dataset_path, roots), loader)
    if not 0.0 < percent_of_data <= 1.0:
        raise ValueError(f"percent_of_data must be in (0, 1], got {percent_of_data}")
    samples = [parse_sample(row, i) for i, row in enumerate(rows)]
    if not samples:
        raise ValueError("the dataset holds no samples")
    keep = max(1, math.ceil(len(samples) * percent_of_data))
    return random.Random(seed).sample(samples, keep) if keep < len(samples) else samples


def write_samples(rows: list, scratch: str | Path) -> Path:
    """Write the inline samples to ``<scratch>/datasets/samples-<time>.jsonl`` (the reference ``save_samples``)."""
    folder = Path(scratch) / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"samples-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
