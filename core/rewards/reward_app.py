"""``service=reward``: the whole reward mix behind one endpoint, for many trainer workers at once.

* ``POST /score`` (ours) ``{samples: [{completion, ground_truth, prompt, extra_info, data_source}],
  on_failure?}`` → ``{results: [{score, components, failures, fallbacks}], weights, on_failure}``:
  ``components[name]`` is ``null`` where that component could not score the sample, and
  ``failures[name]`` says why; ``score`` is the weighted total under ``on_failure`` (the
  request's, else the service's).
* ``POST /get_reward`` (OpenRLHF's remote reward model) ``{query, prompts, labels}`` →
  ``{rewards, scores, extra_logs}``: ``query[i]`` is prompt + response, the response is what
  follows ``prompts[i]``, ``labels[i]`` the ground truth; ``extra_logs`` has one list per component
  (what it added to the total) and ``unscored/<component>`` (1.0 where it failed), which
  OpenRLHF logs. A sample with no total (``skip``, nothing scored) gets 0.0 there, flagged in
  ``extra_logs``, since OpenRLHF needs a number.
* ``GET /info`` → ``{components: {name: weight}, on_failure, max_client_batch_size}``.
* ``GET /health``, ``GET /metrics`` (per-component latency and unscored samples, model calls).

Samples of concurrent requests are merged by the micro-batcher, so 32 workers sending one sample
each cost one call per component, not 32. ``extra_info.server_url`` is refused (400): a request
never chooses where this service sends its own traffic.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from core.rewards.base import RewardSample
from core.rewards.protocols import MixScores, RewardScorer
from core.serving.app import ServerSettings, add_batcher, check_batch_size, create_app
from core.serving.errors import APIError

log = logging.getLogger(__name__)

# extra_info keys a component would use to call a server of the request's choosing.
ROUTING_KEYS = ("server_url",)


class RewardSampleIn(BaseModel):
    """One completion to score (``core.rewards.base.RewardSample``)."""

    model_config = ConfigDict(extra="forbid")
    completion: str
    ground_truth: Any = Field(None, description="a string, a list of them, or verl's {ground_truth | target: ...}")
    prompt: str = ""
    extra_info: dict[str, Any] = Field(default_factory=dict)
    data_source: str = ""


class ScoreRequest(BaseModel):
    """``POST /score``."""

    model_config = ConfigDict(extra="forbid")
    samples: list[RewardSampleIn]
    on_failure: Literal["fallback", "zero", "skip"] | None = None


class SampleScore(BaseModel):
    """One sample: the total, each component's score (``null`` where it failed), why, and fallbacks."""

    score: float | None
    components: dict[str, float | None]
    failures: dict[str, str]
    fallbacks: dict[str, float]


class ScoreResponse(BaseModel):
    """``POST /score``."""

    results: list[SampleScore]
    weights: dict[str, float]
    on_failure: str


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request."""

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class GetRewardResponse(BaseModel):
    """OpenRLHF's remote reward model answer."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class RewardInfo(BaseModel):
    """``GET /info``."""

    components: dict[str, float]
    on_failure: str
    max_client_batch_size: int


def response_of(query: str, prompt: str) -> str:
    """What follows the prompt in an OpenRLHF query (the whole query when it does not start with it).

    >>> response_of("Q: 2+2? A: 4", "Q: 2+2?")
    ' A: 4'
    """
    return query[len(prompt) :] if prompt and query.startswith(prompt) else query


def _sample(s: RewardSampleIn) -> RewardSample:
    routed = [k for k in ROUTING_KEYS if k in s.extra_info]
    if routed:
        raise APIError(
            400, f"extra_info.{routed[0]} is not accepted: the reward service calls only its configured servers"
        )
    return RewardSample(s.completion, s.ground_truth, s.prompt, dict(s.extra_info), s.data_source)


def reward_app(
    engine: RewardScorer, settings: ServerSettings, max_batch_size: int = 256, max_wait_ms: float = 5.0
) -> FastAPI:
    """The FastAPI app over ``engine`` (a ``RewardScorer``: the mix itself, or a client of another service)."""
    weights = engine.weights()
    app = create_app("reward", settings, metrics_namespace="reward", health=lambda: {"components": list(weights)})
    metrics = app.state.metrics
    seconds = metrics.histogram(
        "component_seconds",
        "seconds a component took per merged batch",
        (0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0),
        labels=("component",),
    )
    unscored = metrics.counter("component_unscored", "samples a component could not score", ("component",))

    def run_batch(samples: list[RewardSample], on_failure: str) -> list[dict]:
        try:
            scores = engine.score(samples, on_failure)
        except ValueError as exc:  # bad input in some sample
            if len(samples) == 1:
                return [{"error": str(exc)}]
            # a bad sample must not fail the requests merged with it: score them one by one
            return [run_batch([s], on_failure)[0] for s in samples]
        for name in weights:
            if name in scores.seconds:
                seconds.labels(component=name).observe(scores.seconds[name])
            unscored.labels(component=name).inc(len(scores.failures.get(name, {})))
        return [scores.sample(i) for i in range(len(samples))]

    batcher = add_batcher(app, run_batch, max_batch_size, max_wait_ms)

    async def score(samples: list[RewardSample], on_failure: str) -> list[dict]:
        scored = await batcher.submit(samples, key=on_failure)
        bad = next((s["error"] for s in scored if "error" in s), None)
        if bad is not None:
            raise APIError(400, bad)
        return scored

    @app.post("/score", responses={200: {"model": ScoreResponse}})
    async def _score(req: ScoreRequest):
        check_batch_size(len(req.samples), settings, "samples")
        samples = [_sample(s) for s in req.samples]
        on_failure = req.on_failure or engine.on_failure
        scored = await score(samples, on_failure)
        return {"results": scored, "weights": weights, "on_failure": on_failure}

    @app.post("/get_reward", responses={200: {"model": GetRewardResponse}})
    async def _get_reward(req: GetRewardRequest):
        n = len(req.query)
        check_batch_size(n, settings, "query")
        prompts = req.prompts if req.prompts is not None else [""] * n
        labels = req.labels if req.labels is not None else [None] * n
        if len(prompts) != n or len(labels) != n:
            raise APIError(422, f"query, prompts and labels differ in length ({n}, {len(prompts)}, {len(labels)})")
        samples = [
            RewardSample(response_of(q, p), label, p) for q, p, label in zip(req.query, prompts, labels, strict=True)
        ]
        scores = MixScores.from_samples(await score(samples, engine.on_failure), weights, engine.on_failure)
        rewards = [t if t is not None else 0.0 for t in scores.total]
        extra_logs = {name: [scores.value(name, i) or 0.0 for i in range(n)] for name in weights}
        extra_logs.update(
            {f"unscored/{name}": [float(i in scores.failures.get(name, {})) for i in range(n)] for name in weights}
        )
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}

    @app.get("/info", responses={200: {"model": RewardInfo}})
    async def _info():
        return {
            "components": weights,
            "on_failure": engine.on_failure,
            "max_client_batch_size": settings.max_batch_items,
        }

    return app
