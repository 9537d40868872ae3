"""The reward mix over HTTP from ``service=reward``: the same ``score`` as ``RewardMix``, so a
trainer holds either (``reward=remote``), and the same per-component values and failures."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from core.rewards.base import RewardSample
from core.rewards.protocols import MixScores, check_on_failure
from core.serving.errors import ServiceError
from core.serving.http import HTTPClient, chunks

log = logging.getLogger(__name__)


def _wire(sample: RewardSample) -> dict:
    truth = sample.ground_truth
    if hasattr(truth, "tolist"):  # numpy arrays, as parquet-backed datasets give them
        truth = truth.tolist()
    return {
        "completion": sample.completion,
        "ground_truth": truth,
        "prompt": sample.prompt,
        "extra_info": sample.extra_info,
        "data_source": sample.data_source,
    }


class RewardClient:
    """``POST /score`` to a reward service (or several replicas), chunked and retried.

    Args:
        url: the service's base URL, or several replicas' (a list, or comma-separated).
        on_failure: sent with every request (``fallback``, ``zero`` or ``skip``): what a component
            that could not score a sample adds to its total.
        batch_size: samples per request; ``concurrency`` requests in flight at once.
        Other args configure the pooled ``HTTPClient``.

    When the service itself cannot answer, every component of those samples is unscored (reason
    given), counted under ``service.requests_failed``: the total follows ``on_failure`` as for any
    failure (no fallback exists on this side).
    """

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8100",
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        on_failure: str = "fallback",
        batch_size: int = 256,
        concurrency: int = 4,
    ):
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.on_failure = check_on_failure(on_failure)
        self.batch_size, self.concurrency = int(batch_size), max(1, int(concurrency))
        self._weights: dict[str, float] | None = None
        self.stats = {"samples": 0, "requests_failed": 0}
        self.unscored: dict[str, int] = {}

    def weights(self) -> dict[str, float]:
        """The service's components and weights (``GET /info``, asked once)."""
        if self._weights is None:
            self._weights = {k: float(v) for k, v in self.http.get("/info")["components"].items()}
        return dict(self._weights)

    def score(self, samples: Sequence[RewardSample], on_failure: str | None = None) -> MixScores:
        """Every component's score of each sample, failures and totals, from the service."""
        policy = check_on_failure(on_failure or self.on_failure)
        weights = self.weights()
        parts = list(chunks(list(samples), self.batch_size))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(parts)))) as pool:
            rows = [row for part in pool.map(lambda part: self._score_part(part, policy), parts) for row in part]
        self.stats["samples"] += len(rows)
        scores = MixScores.from_samples(rows, weights, policy)
        for name, failed in scores.failures.items():
            self.unscored[name] = self.unscored.get(name, 0) + len(failed)
        return scores

    def _score_part(self, part: Sequence[RewardSample], policy: str) -> list[dict]:
        try:
            return self.http.post("/score", {"samples": [_wire(s) for s in part], "on_failure": policy})["results"]
        except ServiceError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                raise ValueError(str(exc)) from None  # the service refused the samples: bad input
            self.stats["requests_failed"] += 1
            log.warning("reward service failed on %d samples: %s", len(part), exc)
            reason = f"reward service failed: {exc}"
            return [{"components": {}, "failures": dict.fromkeys(self.weights(), reason)} for _ in part]

    def failures(self) -> dict[str, dict[str, int]]:
        """Samples each component could not score, and requests the service could not answer."""
        out = {name: {"unscored": n} for name, n in self.unscored.items() if n}
        if self.stats["requests_failed"]:
            out["service"] = {"requests_failed": self.stats["requests_failed"]}
        return out

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()
