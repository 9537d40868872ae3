"""The InfoGain reference service's EM + IG reward for search-augmented answers.

``score = EM(last <answer> block, gold answers) + ig_weight · ΔIG(question, retrieved context, gold)``

where the context is the concatenation of the completion's ``<information>…</information>``
blocks; a completion that retrieved nothing gets no IG term. ``scorer`` is an
``InfoGainEngine`` (in-process) or an ``InfoGainClient`` (the service): same ``compute``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.rewards.answers import extract_answer
from core.rewards.base import RewardSample, count_failure, mark_unscored, references
from core.rewards.builtin import normalize_answer
from infogain.protocols import InfoGainScorer

_INFORMATION = re.compile(r"<information>(.*?)</information>", re.DOTALL | re.IGNORECASE)


def retrieved_context(completion: str) -> str:
    """The text of every ``<information>`` block, joined.

    >>> retrieved_context("<search>q</search><information>Doc 1</information> x <information>Doc 2</information>")
    'Doc 1\\nDoc 2'
    """
    return "\n".join(block.strip() for block in _INFORMATION.findall(completion))


class QAExactMatchIG:
    """Exact match of the final answer plus weighted information gain of what was retrieved."""

    name = "qa_em_ig"
    failure_keys = ("ig_errors",)

    def __init__(self, scorer: InfoGainScorer, ig_weight: float = 0.6):
        self.scorer, self.ig_weight = scorer, float(ig_weight)
        self.stats = {"samples": 0, "ig_items": 0, "ig_errors": 0}

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        scores, items, owners = [], [], []
        for i, s in enumerate(samples):
            golds = references(s.ground_truth)
            answer = normalize_answer(extract_answer(s.completion))
            scores.append(float(any(answer == normalize_answer(g) for g in golds)))
            context = retrieved_context(s.completion)
            if context and golds and self.ig_weight:
                question = str(s.extra_info.get("question") or s.extra_info.get("problem") or s.prompt)
                items.append({"question": question, "context": context, "answers": golds})
                owners.append(i)
        if items:
            for i, result in zip(owners, self.scorer.compute(items), strict=True):
                if result["score"] is None or result.get("error"):  # the client's zero fallback carries its error
                    count_failure(self.stats, "ig_errors")
                    # the exact-match part stands: a fallback, not a placeholder
                    mark_unscored([i], f"InfoGain failed: {result.get('error') or 'no score'}", fell_back=True)
                else:
                    scores[i] += self.ig_weight * result["score"]
        self.stats["samples"] += len(samples)
        self.stats["ig_items"] += len(items)
        return scores
