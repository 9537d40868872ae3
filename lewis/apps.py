"""``service=listener`` and ``service=speaker``: the Lewis reference scripts' two players as HTTP services.

Listener: ``POST /score`` ``{candidate_paths, question, topk}`` → ``{yes_probabilities,
predicted_index, topk_indices}``; ``POST /batch_score`` ``{batch: [...]}`` → ``{results, took}``.
Speaker: ``POST /describe`` ``{image_path, prompt?}`` → ``{text, thinking, coarse, detailed}``;
``POST /batch_describe`` ``{batch: [...]}`` → ``{results, took}``. Both: ``GET /health``, ``/metrics``.

Images are paths under the configured image roots (else 403) or ``data:image/...;base64`` URIs.
``INFERENCE_CONCURRENCY`` requests run at once; one that waits longer than
``INFERENCE_ACQUIRE_TIMEOUT`` seconds for its turn gets 503 (the kit's concurrency gate).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, WithJsonSchema

from core.serving.app import ServerSettings, check_batch_size, create_app

log = logging.getLogger(__name__)


def _documented(**fields) -> dict:
    """JSON schema of an object with these properties: what a client should send, while the
    engine does the checking (its messages name the item and field at fault, with a 400)."""
    return {"type": "object", "properties": fields}


_STR = {"type": "string", "minLength": 1}
SCORE_ITEM = _documented(
    candidate_paths={"type": "array", "items": _STR, "minItems": 1, "maxItems": 64},
    question={"type": "string", "minLength": 1, "maxLength": 4000},
    topk={"type": "integer", "minimum": 1, "default": 1},
)
DESCRIBE_ITEM = _documented(image_path=_STR, prompt={"type": ["string", "null"], "maxLength": 4000})


class ScoreRequest(BaseModel):
    """One listener item."""

    candidate_paths: Annotated[Any, WithJsonSchema(SCORE_ITEM["properties"]["candidate_paths"])] = None
    question: Annotated[Any, WithJsonSchema(SCORE_ITEM["properties"]["question"])] = None
    topk: Annotated[Any, WithJsonSchema(SCORE_ITEM["properties"]["topk"])] = 1


class ScoreBatch(BaseModel):
    """``{batch: [item, ...]}`` for ``/batch_score``."""

    batch: list[Annotated[dict, WithJsonSchema(SCORE_ITEM)]]


class Scores(BaseModel):
    """One listener answer."""

    yes_probabilities: list[float]
    predicted_index: int
    topk_indices: list[int]


class ScoresBatch(BaseModel):
    """``/batch_score`` answer (``took``: seconds)."""

    results: list[Scores]
    took: float


class DescribeRequest(BaseModel):
    """One speaker item."""

    image_path: Annotated[Any, WithJsonSchema(DESCRIBE_ITEM["properties"]["image_path"])] = None
    prompt: Annotated[Any, WithJsonSchema(DESCRIBE_ITEM["properties"]["prompt"])] = None


class DescribeBatch(BaseModel):
    """``{batch: [item, ...]}`` for ``/batch_describe``."""

    batch: list[Annotated[dict, WithJsonSchema(DESCRIBE_ITEM)]]


class Description(BaseModel):
    """One speaker answer: the text and its tags (``null`` when missing)."""

    text: str
    thinking: str | None
    coarse: str | None
    detailed: str | None


class DescriptionsBatch(BaseModel):
    """``/batch_describe`` answer (``took``: seconds)."""

    results: list[Description]
    took: float


def listener_app(engine, settings: ServerSettings) -> FastAPI:
    """The listener service over a ``ListenerEngine``."""
    app = create_app(
        "listener",
        settings,
        metrics_namespace="listener",
        health=lambda: {"model_calls": engine.model_calls, "random_weights": engine.random_weights},
    )

    # Checked in dependencies, which run before the route takes its place in the concurrency
    # gate: a bad request is answered at once, even while the model is busy.
    def one(req: ScoreRequest) -> list[dict]:
        items = [req.model_dump()]
        engine.validate(items)
        return items

    def many(req: ScoreBatch) -> list[dict]:
        check_batch_size(len(req.batch), settings, "batch")
        engine.validate(req.batch)
        return req.batch

    @app.post("/score", responses={200: {"model": Scores}})
    def _score(items: list[dict] = Depends(one)):
        return engine.batch_score(items)["results"][0]

    @app.post("/batch_score", responses={200: {"model": ScoresBatch}})
    def _batch(items: list[dict] = Depends(many)):
        return engine.batch_score(items)

    return app


def speaker_app(engine, settings: ServerSettings) -> FastAPI:
    """The speaker service over a ``SpeakerEngine``."""
    app = create_app(
        "speaker",
        settings,
        metrics_namespace="speaker",
        health=lambda: {"model_calls": engine.model_calls, "random_weights": engine.random_weights},
    )

    def one(req: DescribeRequest) -> list[dict]:
        items = [req.model_dump()]
        engine.validate(items)
        return items

    def many(req: DescribeBatch) -> list[dict]:
        check_batch_size(len(req.batch), settings, "batch")
        engine.validate(req.batch)
        return req.batch

    @app.post("/describe", responses={200: {"model": Description}})
    def _describe(items: list[dict] = Depends(one)):
        return engine.batch_describe(items)["results"][0]

    @app.post("/batch_describe", responses={200: {"model": DescriptionsBatch}})
    def _batch(items: list[dict] = Depends(many)):
        return engine.batch_describe(items)

    return app
