"""Reference-likelihood reward: how likely a language model finds the reference answer once it
has read the prompt and the completion.

For each (completion, reference) pair the model scores the text ``context + continuation`` in
one forward over the prompt (prompt log-probabilities: in process, or from any server that
answers OpenAI's ``echo`` with ``logprobs``, vLLM and ours alike), where

    context      = context_template.format(prompt=..., completion=...)
    continuation = continuation_template.format(reference=...)

The score is ``exp(mean log p(continuation token | everything before it))``: the geometric mean
of the continuation tokens' probabilities, in (0, 1], so the mix can weight it as any other
component. A completion's score is its best over its references. Scores are cached by (context,
continuation); a server failure scores the pairs 0.0, counted (``requests_failed``) and reported
as unscored, never an exception into the trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from core.models.generation import Completion, SamplingParams
from core.models.protocols import TextGenerator
from core.rewards.base import RewardSample, count_failure, mark_unscored, references
from core.rewards.cache import LRUCache
from core.serving.errors import ServiceError
from core.serving.http import chunks

log = logging.getLogger(__name__)

SCORE_PROMPT = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=0, prompt_logprobs=0)


def continuation_score(scored: Completion, context_chars: int) -> float:
    """``exp`` of the mean log-probability of the prompt tokens that start at or after
    ``context_chars`` (the continuation's), from a completion scored with ``prompt_logprobs``;
    0.0 when the continuation has no token of its own."""
    at, values = 0, []
    for token in scored.prompt_logprobs or []:
        if at >= context_chars and token.logprob is not None:
            values.append(token.logprob)
        at += len(token.token)
    return math.exp(sum(values) / len(values)) if values else 0.0


class ReferenceLikelihoodReward:
    """Scores completions by the model's likelihood of the reference after them.

    Args:
        generator: a ``GenerationEngine`` (in process) or ``GenerationClient`` (our server or vLLM).
        context_template: what the model reads first, with ``{prompt}`` and ``{completion}``.
        continuation_template: what is scored, with ``{reference}``.
        batch_size: texts per generator call.
        cache_size: (context, continuation) scores kept.
    """

    name = "likelihood"
    failure_keys = ("requests_failed",)

    def __init__(
        self,
        generator: TextGenerator,
        context_template: str = "{prompt}\n{completion}\nSo the answer is:",
        continuation_template: str = " {reference}",
        batch_size: int = 32,
        cache_size: int = 10_000,
    ):
        for template, fields in ((context_template, ("prompt", "completion")), (continuation_template, ("reference",))):
            try:
                template.format(**dict.fromkeys(fields, ""))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template {template!r} may use only {{{'}, {'.join(fields)}}}: {exc}") from None
        self.generator = generator
        self.context_template, self.continuation_template = context_template, continuation_template
        self.batch_size = batch_size
        self.cache = LRUCache(cache_size)
        self.stats = {"samples": 0, "texts_scored": 0, "requests_failed": 0}

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        pairs = []  # (sample index, context, continuation)
        for i, s in enumerate(samples):
            context = self.context_template.format(prompt=s.prompt or "", completion=s.completion)
            for ref in references(s.ground_truth):
                pairs.append((i, context, self.continuation_template.format(reference=ref)))
        # this call's scores: the cache's, then the new ones (a batch larger than the cache would
        # otherwise lose some to eviction before they are read)
        found = {}
        for _, context, continuation in pairs:
            cached = self.cache.get((context, continuation))
            if cached is not None:
                found[context, continuation] = cached
        todo = list(dict.fromkeys((c, r) for _, c, r in pairs if (c, r) not in found))
        failed = set()
        for part in chunks(todo, self.batch_size):
            try:
                scored = self.generator.complete([c + r for c, r in part], SCORE_PROMPT)
            except ServiceError as exc:
                count_failure(self.stats, "requests_failed")
                log.warning("likelihood reward: scoring %d texts failed: %s", len(part), exc)
                failed.update(part)
                continue
            self.stats["texts_scored"] += len(part)
            for (context, continuation), group in zip(part, scored, strict=True):
                found[context, continuation] = continuation_score(group[0], len(context))
                self.cache.put((context, continuation), found[context, continuation])
        scores = [0.0] * len(samples)
        failed_samples, scored_samples = set(), set()
        for i, context, continuation in pairs:
            if (context, continuation) in failed:
                failed_samples.add(i)
            else:
                scored_samples.add(i)
                scores[i] = max(scores[i], found[context, continuation])
        mark_unscored(sorted(failed_samples - scored_samples), "the likelihood server failed")
        self.stats["samples"] += len(samples)
        return scores
