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
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from core.serving.app import ServerSettings, add_batcher, check_batch_size, create_app

log = logging.getLogger(__name__)


class InfoGainRequest(BaseModel):
    """The request body; each item is checked on its own (its problems go to ``errors[i]``)."""

    items: list[Any]


def infogain_app(engine, settings: ServerSettings, max_batch_size: int = 64, max_wait_ms: float = 10.0) -> FastAPI:
    """The FastAPI app over ``engine`` (an ``InfoGainEngine`` or a ``WorkerPool``: same ``compute`` and ``health``)."""
    app = create_app(
        "infogain", settings, metrics_namespace="infogain", health=lambda: {"status": "healthy", **engine.health()}
    )
    batcher = add_batcher(app, lambda items, _key: engine.compute(items), max_batch_size, max_wait_ms)

    @app.post("/compute_info_gain")
    async def _compute(req: InfoGainRequest):
        check_batch_size(len(req.items), settings, "items")
        results = await batcher.submit(req.items)
        return {
            "scores": [r["score"] for r in results],
            "errors": [r["error"] for r in results],
            "details": [r["details"] for r in results],
        }

    return app
