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
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from core.serving.app import ServerSettings, check_batch_size, create_app

log = logging.getLogger(__name__)


class ScoreRequest(BaseModel):
    """One listener item (its fields are checked by the engine, which names the bad one)."""

    candidate_paths: Any = None
    question: Any = None
    topk: Any = 1


class BatchRequest(BaseModel):
    """``{batch: [...]}`` for ``/batch_score`` and ``/batch_describe``."""

    batch: list[dict]


class DescribeRequest(BaseModel):
    """One speaker item."""

    image_path: Any = None
    prompt: Any = None


def listener_app(engine, settings: ServerSettings) -> FastAPI:
    """The listener service over a ``ListenerEngine``."""
    app = create_app(
        "listener",
        settings,
        metrics_namespace="listener",
        health=lambda: {"model_calls": engine.model_calls, "random_weights": engine.random_weights},
    )

    @app.post("/score")
    def _score(req: ScoreRequest):
        return engine.batch_score([req.model_dump()])["results"][0]

    @app.post("/batch_score")
    def _batch(req: BatchRequest):
        check_batch_size(len(req.batch), settings, "batch")
        return engine.batch_score(req.batch)

    return app


def speaker_app(engine, settings: ServerSettings) -> FastAPI:
    """The speaker service over a ``SpeakerEngine``."""
    app = create_app(
        "speaker",
        settings,
        metrics_namespace="speaker",
        health=lambda: {"model_calls": engine.model_calls, "random_weights": engine.random_weights},
    )

    @app.post("/describe")
    def _describe(req: DescribeRequest):
        return engine.batch_describe([req.model_dump()])["results"][0]

    @app.post("/batch_describe")
    def _batch(req: BatchRequest):
        check_batch_size(len(req.batch), settings, "batch")
        return engine.batch_describe(req.batch)

    return app
