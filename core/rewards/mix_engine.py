"""The reward mix, in this process: the engine of the reward capability (``service=reward`` serves it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from core.rewards.base import RewardSample, failure_scope
from core.rewards.protocols import MixScores, check_on_failure

log = logging.getLogger(__name__)


class RewardMix:
    """A weighted sum of reward functions: ``total = Σ weight_i · fn_i(samples)``.

    Args:
        components: ``{name: {"fn": RewardFunction, "weight": float}}`` (the ``reward:`` config).
        on_failure: what a component that could not score a sample adds to the total
            (``fallback``, ``zero`` or ``skip``; see ``core.rewards.protocols.ON_FAILURE``).

    A component reports the samples it could not score with ``mark_unscored``; one that raises
    (other than ``ValueError``, which is bad input and propagates) has failed on the whole batch:
    logged with its traceback, counted under ``errors``, and its samples reported failed.
    """

    def __init__(self, components: Mapping[str, Mapping], on_failure: str = "fallback"):
        if not components:
            raise ValueError("a reward mix needs at least one component")
        self.components = {name: (c["fn"], float(c.get("weight", 1.0))) for name, c in components.items()}
        self.on_failure = check_on_failure(on_failure)
        self.errors = dict.fromkeys(self.components, 0)

    def weights(self) -> dict[str, float]:
        """The components' names and weights, in order."""
        return {name: weight for name, (_fn, weight) in self.components.items()}

    def score(self, samples: Sequence[RewardSample], on_failure: str | None = None) -> MixScores:
        """Every component's scores, what failed, and the weighted total."""
        parts, failures, fallbacks, seconds = {}, {}, {}, {}
        for name, (fn, _weight) in self.components.items():
            started = time.perf_counter()
            with failure_scope() as failed:
                try:
                    raw = [float(s) for s in fn(samples)]
                except ValueError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one broken component must not lose the others' scores
                    log.exception("reward component %s failed on %d samples", name, len(samples))
                    self.errors[name] += 1
                    raw = [0.0] * len(samples)
                    failed.samples = dict.fromkeys(range(len(samples)), (f"{type(exc).__name__}: {exc}", False))
            seconds[name] = time.perf_counter() - started
            if len(raw) != len(samples):
                raise RuntimeError(f"reward component {name} returned {len(raw)} scores for {len(samples)} samples")
            values: list[float | None] = list(raw)
            for i, (reason, fell_back) in failed.samples.items():
                values[i] = None
                failures.setdefault(name, {})[i] = reason
                if fell_back:
                    fallbacks.setdefault(name, {})[i] = raw[i]
            parts[name] = values
        return MixScores(parts, self.weights(), on_failure or self.on_failure, failures, fallbacks, seconds)

    def stats(self) -> dict[str, dict]:
        """The counters of each component that keeps them."""
        return {name: dict(getattr(fn, "stats", {})) for name, (fn, _w) in self.components.items()}

    def failures(self) -> dict[str, dict[str, int]]:
        """Each component's failure counters (its ``failure_keys``, and ``errors`` when it raised),
        for components that have any."""
        out = {}
        for name, (fn, _w) in self.components.items():
            stats = getattr(fn, "stats", {})
            counts = {k: stats[k] for k in getattr(fn, "failure_keys", ()) if k in stats}
            if self.errors[name]:
                counts["errors"] = self.errors[name]
            if counts:
                out[name] = counts
        return out

    def advice(self) -> list[str]:
        """What the components advise for the failures they counted."""
        out = []
        for fn, _w in self.components.values():
            stats = getattr(fn, "stats", {})
            out.extend(text for key, text in getattr(fn, "failure_advice", {}).items() if stats.get(key))
        return out
