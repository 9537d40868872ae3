"""The reward capability: a whole reward mix scoring a batch of samples, in this process
(``RewardMix``) or behind ``service=reward`` (``RewardClient``), and the one rule that turns its
components' scores and failures into a total."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from core.rewards.base import RewardSample

# What a component that could not score a sample contributes to that sample's total:
#   fallback  the component's own fallback score where it has one (embedding: lexical similarity;
#             EM + InfoGain: the exact-match part), else 0.0. Today's behaviour, the default.
#   zero      0.0.
#   skip      nothing: the total is the weighted sum of the components that did score (TRL gets
#             None for that component); a sample no component could score has no total (None).
ON_FAILURE = ("fallback", "zero", "skip")


def check_on_failure(on_failure: str) -> str:
    """``on_failure`` if it is one of ``ON_FAILURE``, else ValueError."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
    return on_failure


@dataclass
class MixScores:
    """A batch scored by a reward mix.

    ``components[name][i]`` is component ``name``'s score of sample ``i``, ``None`` where it could
    not score it; then ``failures[name][i]`` says why and ``fallbacks[name][i]`` holds its fallback
    score, if it has one. ``weights`` are the mix's; ``total`` follows ``on_failure`` (``value``).
    """

    components: dict[str, list[float | None]]
    weights: dict[str, float]
    on_failure: str = "fallback"
    failures: dict[str, dict[int, str]] = field(default_factory=dict)
    fallbacks: dict[str, dict[int, float]] = field(default_factory=dict)
    # seconds each component took (in process; for the service's per-component latency metrics)
    seconds: dict[str, float] = field(default_factory=dict)
    total: list[float | None] = field(init=False)

    def __post_init__(self):
        check_on_failure(self.on_failure)
        n = len(next(iter(self.components.values()), []))
        self.total = [self._total(i) for i in range(n)]

    def value(self, name: str, i: int) -> float | None:
        """What component ``name`` adds (before its weight) to sample ``i``'s total.

        >>> s = MixScores({"a": [None]}, {"a": 1.0}, "skip", {"a": {0: "down"}})
        >>> s.value("a", 0), s.total
        (None, [None])
        """
        score = self.components[name][i]
        if score is not None:
            return score
        if self.on_failure == "skip":
            return None
        if self.on_failure == "zero":
            return 0.0
        return self.fallbacks.get(name, {}).get(i, 0.0)

    def _total(self, i: int) -> float | None:
        values = [(self.weights[name], self.value(name, i)) for name in self.components]
        kept = [w * v for w, v in values if v is not None]
        return sum(kept) if kept else None

    def sample(self, i: int) -> dict:
        """Sample ``i`` as the reward service answers it: ``score``, ``components``, ``failures``, ``fallbacks``."""
        return {
            "score": self.total[i],
            "components": {name: values[i] for name, values in self.components.items()},
            "failures": {name: f[i] for name, f in self.failures.items() if i in f},
            "fallbacks": {name: f[i] for name, f in self.fallbacks.items() if i in f},
        }

    @classmethod
    def from_samples(
        cls, rows: Sequence[Mapping], weights: Mapping[str, float], on_failure: str = "fallback"
    ) -> MixScores:
        """The scores of rows in ``sample()``'s shape (what a client reads back from the service)."""

        def by_component(key: str) -> dict[str, dict]:
            """``{name: {sample index: row[key][name]}}`` for the components some row has under ``key``."""
            found = {
                name: {i: row[key][name] for i, row in enumerate(rows) if name in (row.get(key) or {})}
                for name in weights
            }
            return {name: per_sample for name, per_sample in found.items() if per_sample}

        components = {name: [row["components"].get(name) for row in rows] for name in weights}
        return cls(components, dict(weights), on_failure, by_component("failures"), by_component("fallbacks"))


@runtime_checkable
class RewardScorer(Protocol):
    """A whole reward mix: every component's score of each sample, failures and the weighted total.

    ``on_failure`` (one of ``ON_FAILURE``; ``None``: the scorer's own setting) decides what a
    component that could not score a sample adds to its total. Never raises for a failing
    component or server: failures come back in ``MixScores.failures``; bad input raises ``ValueError``.
    """

    on_failure: str

    def score(self, samples: Sequence[RewardSample], on_failure: str | None = None) -> MixScores: ...

    def weights(self) -> dict[str, float]:
        """The components' names and weights, in order."""
        ...

    def failures(self) -> dict[str, dict[str, int]]:
        """Failure counters per component so far (for the trainers' logs)."""
        ...
