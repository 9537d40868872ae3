"""The Lewis reference scripts' rewards for the Lewis game (speaker side) and their mirror for the listener.

Speaker: ``ListenerAccuracy`` (1.0 when the listener picks the target from the description),
``TagFormat`` (1.0 when ``<thinking>``, ``<coarse>`` and ``<detailed>`` are all present and closed),
``OneSentence`` (0.1 for exactly one sentence). Listener: ``ChoiceAccuracy`` (1.0 for the target's
number) and ``ChoiceFormat`` (1.0 for an answer that is exactly one number in range). Each sample's
``extra_info`` holds the game: ``candidates`` (image paths) and ``target_index``. Weights come from
the reward mix config.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from core.rewards.base import RewardSample, count_failure, mark_unscored
from core.rewards.cache import LRUCache
from core.training.dist import all_gather_object_fallback, get_world_info
from lewis.engines import parse_description
from lewis.protocols import Listener

log = logging.getLogger(__name__)

QUESTION = "Does this image match the description: {description}? Answer yes or no."
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def spoken_description(completion: str) -> str:
    """What the listener hears: the ``<detailed>`` text, else ``<coarse>``, else the text without tags."""
    parts = parse_description(completion)
    text = parts["detailed"] or parts["coarse"]
    return text if text else re.sub(r"</?\w+>", " ", completion).strip()


class TagFormat:
    """1.0 when all three tags are present and closed, else 0.0."""

    name = "format"

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        return [1.0 if all(v is not None for v in parse_description(s.completion).values()) else 0.0 for s in samples]


class OneSentence:
    """``bonus`` (0.1) when the description is exactly one sentence, else 0.0."""

    name = "length"

    def __init__(self, bonus: float = 0.1):
        self.bonus = bonus

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        out = []
        for s in samples:
            text = spoken_description(s.completion)
            sentences = [p for p in _SENTENCE_END.split(text) if p.strip()]
            ends = len(_SENTENCE_END.findall(text))
            out.append(self.bonus if len(sentences) == 1 and ends == 1 else 0.0)
        return out


class ListenerAccuracy:
    """1.0 when the listener's ``predicted_index`` is the game's target, from the speaker's description.

    The listener is a ``ListenerEngine`` (embedded) or a ``ListenerClient`` (remote; chunked,
    retried). Results are cached by (description, candidates): the same question is never asked
    twice, and with several ranks each rank's new results are shared with all (the Lewis reference scripts'
    distributed cache). A listener failure scores 0.0, is counted and logged; training goes on.
    Every call appends its predictions to ``log_path`` when one is given (JSON lines; the Lewis
    reference scripts' ``LOG_PATH``; the configs default it to the run dir).
    """

    name = "accuracy"
    failure_keys = ("requests_failed",)

    def __init__(
        self, listener: Listener, question: str = QUESTION, log_path: str | None = None, cache_size: int = 100_000
    ):
        self.listener, self.question = listener, question
        self.log_path = Path(log_path) if log_path else None
        self.cache = LRUCache(cache_size)
        self.calls = 0
        self.stats = {"listener_items": 0, "cache_hits": 0, "requests_failed": 0}

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        self.calls += 1
        keys = []
        for s in samples:
            description = spoken_description(s.completion)
            keys.append((description, tuple(s.extra_info["candidates"])))
        known = {k: v for k in dict.fromkeys(keys) if (v := self.cache.get(k)) is not None}
        self.stats["cache_hits"] += sum(1 for k in keys if k in known)
        fresh = self._ask([k for k in dict.fromkeys(keys) if k not in known])
        for gathered in all_gather_object_fallback(fresh):
            self._remember(gathered)
        scores, records = [], []
        for s, key in zip(samples, keys, strict=True):
            result = known.get(key) or fresh.get(key) or {"error": "no result"}
            target = int(s.extra_info["target_index"])
            ok = "error" not in result and result["predicted_index"] == target
            scores.append(1.0 if ok else 0.0)
            if "error" in result:
                mark_unscored([len(scores) - 1], f"listener failed: {result['error']}")
            records.append(
                {
                    "description": key[0],
                    "completion": s.completion,
                    "target_index": target,
                    "predicted_index": result.get("predicted_index"),
                    "yes_probabilities": result.get("yes_probabilities"),
                    "error": result.get("error"),
                    "accuracy": scores[-1],
                }
            )
        self._log(records)
        return scores

    def _ask(self, keys: list[tuple]) -> dict[tuple, dict]:
        if not keys:
            return {}
        batch = [
            {"candidate_paths": list(c), "question": self.question.format(description=d), "topk": 1} for d, c in keys
        ]
        self.stats["listener_items"] += len(batch)
        try:
            results = self.listener.batch_score(batch)["results"]
        except Exception as exc:  # noqa: BLE001 - an embedded listener failing must not stop training
            log.warning("listener failed on %d items: %s", len(batch), exc)
            results = [{"error": f"{type(exc).__name__}: {exc}"}] * len(batch)
        failed = sum(1 for r in results if "error" in r)
        if failed:
            count_failure(self.stats, "requests_failed", failed)
            log.warning("listener could not score %d of %d items; they score 0.0", failed, len(batch))
        return dict(zip(keys, results, strict=True))

    def _remember(self, results: dict) -> None:
        for key, result in results.items():
            if "error" not in result:  # failures are asked again next time
                self.cache.put(key, result)

    def _log(self, records: list[dict]) -> None:
        rank, _ = get_world_info()
        if self.log_path is None or rank != 0:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            for r in records:
                f.write(json.dumps({"call": self.calls, "time": time.time(), **r}) + "\n")


_NUMBER = re.compile(r"\d+")


class ChoiceAccuracy:
    """Listener training: 1.0 when the first number in the answer is the target's (1-based) number."""

    name = "accuracy"

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        out = []
        for s in samples:
            found = _NUMBER.search(s.completion)
            out.append(1.0 if found and int(found.group()) == int(s.extra_info["target_index"]) + 1 else 0.0)
        return out


class ChoiceFormat:
    """Listener training: 1.0 when the answer is exactly one number between 1 and the candidate count."""

    name = "format"

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        out = []
        for s in samples:
            found = _NUMBER.findall(s.completion)
            ok = len(found) == 1 and 1 <= int(found[0]) <= len(s.extra_info["candidates"])
            out.append(1.0 if ok and s.completion.strip() == found[0] else 0.0)
        return out
