"""Small reward functions that need no model."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from core.rewards import RewardSample, references

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
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


def extract_answer(completion: str) -> str:
    """The last ``<answer>…</answer>`` block when there is one, else the whole completion."""
    found = _ANSWER_TAG.findall(completion)
    return found[-1] if found else completion


class ExactMatch:
    """1.0 when the (extracted, normalised) answer equals any normalised reference, else 0.0."""

    name = "exact_match"

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        scores = []
        for s in samples:
            answer = normalize_answer(extract_answer(s.completion))
            scores.append(float(any(answer == normalize_answer(r) for r in references(s.ground_truth))))
        return scores
