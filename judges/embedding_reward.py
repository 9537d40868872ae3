"""Embedding-similarity reward: how close a completion is to its reference in meaning.

score = cos01(e(solution), e(best reference)) · length_factor(best reference, solution)

where ``cos01 = (cos + 1) / 2`` maps cosine similarity to [0, 1], the best reference is the one
with the highest cosine, and ``length_factor`` is 1 while the solution's word count is within
``[ref/threshold, ref·threshold]`` and otherwise shrinks with ``r = min(out/ref, ref/out)``:

=============  ==========================================
none           1
ratio          r
sqrt           √r
log            ln(1 + min(ref, out)) / ln(1 + max(ref, out))
quadratic      r²
exponential    exp(-(1 - r))
=============  ==========================================

When the embedding server cannot answer, the score falls back to lexical similarity
(``difflib.SequenceMatcher`` ratio, best over references) and the failure is counted.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from difflib import SequenceMatcher

import numpy as np

from core.models.embedding_client import EmbeddingClient
from core.models.protocols import Embedder
from core.rewards.base import RewardSample, count_failure, mark_unscored, references
from core.rewards.cache import LRUCache
from core.serving.errors import ServiceError
from judges.references import filter_references

log = logging.getLogger(__name__)

PENALTIES = ("none", "ratio", "sqrt", "log", "quadratic", "exponential")


def length_factor(reference: str, candidate: str, kind: str = "none", threshold: float = 1.5) -> float:
    """The length penalty factor in [0, 1] (1 = no penalty); word counts, as the reference embedding reward defines it.

    >>> length_factor("a b c d", "a b", "ratio", 1.5)
    0.5
    """
    if kind not in PENALTIES:
        raise ValueError(f"unknown length_penalty {kind!r}; choose one of {', '.join(PENALTIES)}")
    ref_len, out_len = len(reference.split()), len(candidate.split())
    if kind == "none" or ref_len == out_len:
        return 1.0
    if ref_len == 0 or out_len == 0:
        return 0.0  # an empty answer to a non-empty reference (or the reverse) is maximally off
    short = out_len / ref_len
    if 1.0 / threshold <= short <= threshold:
        return 1.0
    r = min(short, ref_len / out_len)
    if kind == "ratio":
        return r
    if kind == "sqrt":
        return math.sqrt(r)
    if kind == "log":
        return math.log(1 + min(ref_len, out_len)) / math.log(1 + max(ref_len, out_len))
    if kind == "quadratic":
        return r * r
    return math.exp(-(1.0 - r))


def cosine01(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity mapped from [-1, 1] to [0, 1]; 0 for a zero vector."""
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    if den == 0.0:
        return 0.0
    return (float(np.dot(a, b)) / den + 1.0) / 2.0


def lexical_similarity(a: str, b: str) -> float:
    """difflib's ratio of the lower-cased strings, in [0, 1]."""
    return SequenceMatcher(None, a.lower(), b.lower()).ratio()


class EmbeddingSimilarityReward:
    """Scores completions by embedding similarity to their references.

    Args:
        embedder: an ``EmbeddingEngine`` (in-process) or ``EmbeddingClient`` (TEI-compatible server).
        length_penalty, length_threshold: see the module doc.
        cache_enabled, cache_size: an LRU cache of text → embedding, so repeated texts skip the model.
        fallback: ``lexical`` (difflib ratio) or ``zero`` when the server cannot answer.

    Per-sample ``extra_info`` may override ``server_url``, ``api_key``, ``timeout``,
    ``length_penalty``, ``length_threshold``, ``cache_enabled`` and ``fallback``, and filter references with
    ``target_gt`` / ``filter_gt_by_prompt_token`` + ``prompt``.
    """

    name = "embedding"
    failure_keys = ("requests_failed", "fallback_samples")

    def __init__(
        self,
        embedder: Embedder,
        length_penalty: str = "none",
        length_threshold: float = 1.5,
        cache_enabled: bool = True,
        cache_size: int = 10_000,
        fallback: str = "lexical",
    ):
        check_fallback(fallback)
        length_factor("", "", length_penalty)  # reject an unknown penalty at construction
        self.embedder = embedder
        self.length_penalty = length_penalty
        self.length_threshold = float(length_threshold)
        self.cache_enabled = cache_enabled
        self.cache_size = cache_size
        self.fallback = fallback
        self._caches: dict[int, LRUCache] = {}
        self._clients: dict[tuple, EmbeddingClient] = {}
        self.stats = {"samples": 0, "requests_failed": 0, "fallback_samples": 0}

    def _embedder_for(self, info: dict):
        url = info.get("server_url")
        if not url:
            return self.embedder
        key = (url, info.get("api_key"), info.get("timeout"))
        if key not in self._clients:
            self._clients[key] = EmbeddingClient(
                url, api_key=info.get("api_key"), timeout=float(info.get("timeout") or 30.0)
            )
        return self._clients[key]

    def _vectors(self, embedder, texts: list[str], use_cache: bool) -> dict[str, np.ndarray]:
        cache = self._caches.setdefault(id(embedder), LRUCache(self.cache_size)) if use_cache else None
        found, missing = {}, []
        for text in texts:
            vec = cache.get(text) if cache is not None else None
            if vec is None:
                missing.append(text)
            else:
                found[text] = vec
        if missing:
            for text, vec in zip(missing, embedder.embed(missing, normalize=True, truncate=True), strict=True):
                found[text] = vec
                if cache is not None:
                    cache.put(text, vec)
        return found

    def cache_counts(self) -> tuple[int, int]:
        """(hits, misses) summed over the caches."""
        return (sum(c.hits for c in self._caches.values()), sum(c.misses for c in self._caches.values()))

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        scores = [0.0] * len(samples)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            embedder = self._embedder_for(s.extra_info)
            groups[(id(embedder), bool(s.extra_info.get("cache_enabled", self.cache_enabled)))].append(i)
        self.stats["samples"] += len(samples)
        for (_eid, use_cache), idx in groups.items():
            embedder = self._embedder_for(samples[idx[0]].extra_info)
            refs = {i: filter_references(references(samples[i].ground_truth), samples[i].extra_info) for i in idx}
            texts = list(dict.fromkeys(t for i in idx for t in [samples[i].completion, *refs[i]]))
            try:
                vectors = self._vectors(embedder, texts, use_cache)
            except ServiceError as exc:
                count_failure(self.stats, "requests_failed")
                count_failure(self.stats, "fallback_samples", len(idx))
                log.warning(
                    "embedding server failed (%s); falling back to %s similarity for %d samples",
                    exc,
                    self.fallback,
                    len(idx),
                )
                lexical = []
                for i in idx:
                    scores[i] = self._fallback_score(samples[i], refs[i])
                    if self._fallback_kind(samples[i]) == "lexical" and refs[i]:
                        lexical.append(i)
                reason = f"embedding server failed: {exc}"
                mark_unscored([i for i in idx if i not in set(lexical)], reason)
                mark_unscored(lexical, reason, fell_back=True)
                continue
            for i in idx:
                scores[i] = self._score(samples[i], refs[i], vectors)
        return scores

    def _score(self, sample: RewardSample, refs: list[str], vectors: dict[str, np.ndarray]) -> float:
        if not refs:
            return 0.0
        sims = [cosine01(vectors[sample.completion], vectors[r]) for r in refs]
        best = int(np.argmax(sims))
        kind = sample.extra_info.get("length_penalty", self.length_penalty)
        threshold = float(sample.extra_info.get("length_threshold", self.length_threshold))
        return sims[best] * length_factor(refs[best], sample.completion, kind, threshold)

    def _fallback_kind(self, sample: RewardSample) -> str:
        return check_fallback(sample.extra_info.get("fallback", self.fallback))

    def _fallback_score(self, sample: RewardSample, refs: list[str]) -> float:
        if self._fallback_kind(sample) == "zero" or not refs:
            return 0.0
        return max(lexical_similarity(sample.completion, r) for r in refs)


def check_fallback(fallback: str) -> str:
    """``fallback`` if it is ``lexical`` or ``zero``, else ValueError."""
    if fallback not in ("lexical", "zero"):
        raise ValueError(f"fallback must be 'lexical' or 'zero', got {fallback!r}")
    return fallback
