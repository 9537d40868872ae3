"""``service=infogain``: the information-gain reward service.

* ``POST /compute_info_gain`` ``{items: [{question, context, answers}]}`` →
  ``{scores, errors, details}``: ``scores[i]`` is ΔIG (``null`` when ``errors[i]`` says why);
  one bad item never fails the batch.
* ``GET /health`` → ``{status: "healthy", mode, device | devices, num_workers}``; ``/metrics``.

Concurrent requests are merged by the micro-batcher, so their items share ``generate`` calls.
With ``gpus > 1`` (or ``engine.workers > 1``) the items go to a pool of Ray workers instead of
the in-process engine; the routes are the same.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field, WithJsonSchema

from core.serving.app import ServerSettings, add_batcher, check_batch_size, create_app

log = logging.getLogger(__name__)


class InfoGainItem(BaseModel):
    """One item as documented. Items are checked one by one by the engine, so a bad item gets
    its ``errors[i]`` and never fails the others (the request model does not enforce this shape)."""

    question: str = Field(max_length=2000)
    context: str = ""
    answers: list[str] = Field(min_length=1, max_length=32)


class InfoGainRequest(BaseModel):
    """The request body; each item is checked on its own (its problems go to ``errors[i]``)."""

    items: list[Annotated[Any, WithJsonSchema(InfoGainItem.model_json_schema())]]


class InfoGainResponse(BaseModel):
    """ΔIG per item, ``null`` where ``errors[i]`` says why; ``details[i]`` shows the work."""

    scores: list[float | None]
    errors: list[str | None]
    details: list[dict | None]


def infogain_app(engine, settings: ServerSettings, max_batch_size: int = 64, max_wait_ms: float = 10.0) -> FastAPI:
    """The FastAPI app over ``engine`` (an ``InfoGainEngine`` or a ``WorkerPool``: same ``compute`` and ``health``)."""
    app = create_app(
        "infogain", settings, metrics_namespace="infogain", health=lambda: {"status": "healthy", **engine.health()}
    )
    batcher = add_batcher(app, lambda items, _key: engine.compute(items), max_batch_size, max_wait_ms)

    @app.post("/compute_info_gain", responses={200: {"model": InfoGainResponse}})
    async def _compute(req: InfoGainRequest):
        check_batch_size(len(req.items), settings, "items")
        results = await batcher.submit(req.items)
        return {
            "scores": [r["score"] for r in results],
            "errors": [r["error"] for r in results],
            "details": [r["details"] for r in results],
        }

    return app
