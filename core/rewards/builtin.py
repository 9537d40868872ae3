"""Small reward functions that need no model."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from core.rewards.answers import check_extraction, extract_answer
from core.rewards.base import RewardSample, references

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


class ExactMatch:
    """1.0 when the (extracted, normalised) answer equals any normalised reference, else 0.0.

    ``extract`` says where the completion's answer is (``core.rewards.answers``: ``tags``,
    ``boxed``, ``gsm8k`` or ``none``).

    >>> ExactMatch("gsm8k")([RewardSample("3 + 4 = 7\\n#### 7", ground_truth="7")])
    [1.0]
    """

    name = "exact_match"

    def __init__(self, extract: str = "tags"):
        self.extract = check_extraction(extract)

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        scores = []
        for s in samples:
            answer = normalize_answer(extract_answer(s.completion, self.extract))
            scores.append(float(any(answer == normalize_answer(r) for r in references(s.ground_truth))))
        return scores


class RegexReward:
    """Pattern-based reward (format checks and the like).

    Modes: ``search`` 1.0 when the pattern occurs; ``fullmatch`` 1.0 when the whole stripped
    completion matches; ``coverage`` the fraction of non-space characters inside matches.

    >>> RegexReward("[0-9]", mode="coverage")([RewardSample("a1 b2")])
    [0.5]
    """

    def __init__(self, pattern: str, mode: str = "search", name: str = "regex"):
        if mode not in ("search", "fullmatch", "coverage"):
            raise ValueError(f"mode must be search, fullmatch or coverage, got {mode!r}")
        self.pattern = re.compile(pattern, re.DOTALL)
        self.mode = mode
        self.name = name

    def _score(self, text: str) -> float:
        if self.mode == "search":
            return float(self.pattern.search(text) is not None)
        if self.mode == "fullmatch":
            return float(self.pattern.fullmatch(text.strip()) is not None)
        chars = sum(1 for ch in text if not ch.isspace())
        covered = sum(len(m.group(0).replace(" ", "")) for m in self.pattern.finditer(text))
        return covered / chars if chars else 0.0

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        return [self._score(s.completion) for s in samples]


class LengthReward:
    """1.0 at ``target_words`` words, falling linearly to 0.0 at twice (or zero times) the target.

    >>> LengthReward(4)([RewardSample("one two three four"), RewardSample("one two")])
    [1.0, 0.5]
    """

    name = "length"

    def __init__(self, target_words: int = 8):
        if target_words < 1:
            raise ValueError(f"target_words must be >= 1, got {target_words}")
        self.target_words = target_words

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        return [max(0.0, 1.0 - abs(len(s.completion.split()) - self.target_words) / self.target_words) for s in samples]
