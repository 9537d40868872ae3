"""The information-gain measure on one condition's samples (pure functions, no models).

For N sampled answers r with mean token log-likelihoods ℓ_r, and gold answers a:

* sample weights ``w_r = softmax_r(ℓ_r)``;
* **soft score** ``S = max_a Σ_r w_r · max(P(r⇒a), P(a⇒r))`` (the InfoReasoner reference);
* **hard score**: cluster the samples by bidirectional entailment (``strict``: each entails the
  other; ``loose``: neither contradicts the other, Farquhar et al., Nature 2024) and sum the
  weights of the clusters equivalent to any gold answer;
* **semantic entropy** over the clusters: discrete ``-Σ_c (n_c/N) log(n_c/N)`` and
  likelihood-weighted ``-Σ_c W_c log W_c`` with ``W_c = Σ_{r∈c} w_r``.

An item's score is ``ΔIG = S(with context) - S(question alone)`` (or, with ``metric=entropy``,
``SE(question alone) - SE(with context)``: how much the context reduced uncertainty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Index of each label in the probability triples the entailment scorers return.
ENTAIL, NEUTRAL, CONTRADICT = 0, 1, 2


def sample_weights(mean_logliks: Sequence[float]) -> np.ndarray:
    """``softmax`` of the samples' mean token log-likelihoods.

    >>> sample_weights([0.0, 0.0]).tolist()
    [0.5, 0.5]
    """
    x = np.asarray(mean_logliks, dtype=np.float64)
    x = np.exp(x - x.max())
    return x / x.sum()


def soft_score(weights: np.ndarray, resp_entails_ans: np.ndarray, ans_entails_resp: np.ndarray) -> float:
    """``max_a Σ_r w_r · max(P(r⇒a), P(a⇒r))``; ``resp_entails_ans`` is (N, A), ``ans_entails_resp`` (A, N)."""
    if resp_entails_ans.size == 0:
        return 0.0
    best = np.maximum(resp_entails_ans, ans_entails_resp.T)  # (N, A)
    return float((weights[:, None] * best).sum(axis=0).max())


def related(probs_xy: np.ndarray, probs_yx: np.ndarray, strictness: str) -> bool:
    """Whether x and y mean the same: ``strict`` both directions are entailment (the most likely
    label), ``loose`` neither direction is a contradiction."""
    if strictness == "strict":
        return int(np.argmax(probs_xy)) == ENTAIL and int(np.argmax(probs_yx)) == ENTAIL
    if strictness == "loose":
        return int(np.argmax(probs_xy)) != CONTRADICT and int(np.argmax(probs_yx)) != CONTRADICT
    raise ValueError(f"strictness must be 'strict' or 'loose', got {strictness!r}")


def cluster(texts: Sequence[str], probs: Callable[[str, str], np.ndarray], strictness: str = "strict") -> list[int]:
    """Cluster ids by bidirectional entailment, comparing each text with one representative per
    cluster (its first member) only, never all pairs. ``probs(x, y)`` is the (entail, neutral,
    contradict) triple for x ⇒ y.

    >>> same = lambda x, y: np.array([1.0, 0, 0]) if x[0] == y[0] else np.array([0, 0, 1.0])
    >>> cluster(["apple", "avocado", "banana", "apricot"], same)
    [0, 0, 1, 0]
    """
    ids: list[int] = []
    representatives: list[str] = []
    for text in texts:
        for cid, rep in enumerate(representatives):
            # identical texts are equivalent without asking the model
            if text == rep or related(probs(text, rep), probs(rep, text), strictness):
                ids.append(cid)
                break
        else:
            representatives.append(text)
            ids.append(len(representatives) - 1)
    return ids


def hard_score(
    weights: np.ndarray,
    ids: Sequence[int],
    representatives: Sequence[str],
    answers: Sequence[str],
    probs: Callable[[str, str], np.ndarray],
    strictness: str = "strict",
) -> float:
    """Total weight of the clusters whose representative is equivalent to some gold answer."""
    ids = np.asarray(ids)
    total = 0.0
    for cid, rep in enumerate(representatives):
        if any(related(probs(rep, a), probs(a, rep), strictness) for a in answers):
            total += float(weights[ids == cid].sum())
    return total


def representatives_of(texts: Sequence[str], ids: Sequence[int]) -> list[str]:
    """The first member of each cluster, in cluster-id order."""
    reps: dict[int, str] = {}
    for text, cid in zip(texts, ids, strict=True):
        reps.setdefault(cid, text)
    return [reps[c] for c in sorted(reps)]


def entropies(ids: Sequence[int], weights: np.ndarray) -> dict[str, float]:
    """Semantic entropy over the clusters: ``discrete`` (by counts) and ``weighted`` (by likelihood).

    >>> entropies([0, 0, 1, 1], np.array([0.25, 0.25, 0.25, 0.25]))["discrete"] == float(np.log(2))
    True
    """
    ids = np.asarray(ids)
    clusters = np.unique(ids)
    counts = np.array([(ids == c).sum() for c in clusters], dtype=np.float64) / len(ids)
    mass = np.array([weights[ids == c].sum() for c in clusters], dtype=np.float64)
    mass = mass / mass.sum()
    return {
        "discrete": float(-(counts * np.log(counts)).sum()),
        "weighted": float(-(mass[mass > 0] * np.log(mass[mass > 0])).sum()),
    }


@dataclass
class ConditionResult:
    """Everything measured for one condition (question alone, or with context)."""

    score: float
    weights: np.ndarray
    cluster_ids: list[int]
    entropy: dict[str, float]
    resp_entails_ans: np.ndarray
    ans_entails_resp: np.ndarray


def delta(base: ConditionResult, ctx: ConditionResult, metric: str = "score") -> float:
    """The item's information gain: ``S_ctx - S_base``, or ``SE_base - SE_ctx`` for ``metric=entropy``."""
    if metric == "score":
        return ctx.score - base.score
    if metric == "entropy":
        return base.entropy["weighted"] - ctx.entropy["weighted"]
    raise ValueError(f"metric must be 'score' or 'entropy', got {metric!r}")
