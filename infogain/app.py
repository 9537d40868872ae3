"""``service=infogain``: the information-gain reward service.

* ``POST /compute_info_gain`` ``{items: [{question, context, answers}]}`` →
  ``{scores, errors, details}``: ``scores[i]`` is ΔIG (``null`` when ``errors[i]`` says why);
  one bad item never fails the batch.
* ``GET /health`` → ``{status: "healthy", mode, device | devices, num_workers}``; ``/metrics``.

Concurrent requests are merged by the micro-batcher, so their items share ``generate`` calls.
With ``gpus > 1`` (or ``ig.workers > 1``) the items go to a pool of Ray workers instead of
the in-process engine; the routes are the same.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import FastAPI
from hydra.utils import instantiate
from pydantic import BaseModel

from core.app import ServerSettings, add_batcher, check_batch_size, create_app
from core.serving import serve

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


def gpus_for(gpus: int, device: str | None) -> int:
    """GPUs the service uses: ``gpus`` (IG_NUM_GPUS), or one when only a GPU ``device`` (IG_DEVICE)
    is named, as the reference service's environment recipe does.

    >>> gpus_for(0, "cuda:1"), gpus_for(0, None), gpus_for(4, "cuda:0"), gpus_for(0, "cpu")
    (1, 0, 4, 0)
    """
    if gpus == 0 and device and str(device).startswith("cuda"):
        return 1
    return gpus


def run(cfg) -> None:
    """Entry point of ``python run.py service=infogain``."""
    if cfg.ig.model_path:  # IG_MODEL_PATH, as the InfoGain reference service reads it
        cfg.model.name_or_path = cfg.ig.model_path
    cfg.gpus = gpus_for(int(cfg.gpus), cfg.ig.device)
    workers = int(cfg.ig.workers) or max(1, int(cfg.gpus))
    if workers > 1:
        from infogain.workers import WorkerPool

        engine = WorkerPool(
            cfg.engine,
            workers,
            gpus_per_worker=1 if int(cfg.gpus) > 0 else 0,
            call_timeout_s=float(cfg.ig.worker_timeout_s),
        )
    else:
        if cfg.ig.device and int(cfg.gpus) > 0:  # IG_DEVICE=cuda:N picks the GPU in single-GPU mode
            import torch

            torch.cuda.set_device(cfg.ig.device)
        engine = instantiate(cfg.engine)
    settings = ServerSettings.from_config(cfg.server)
    log.info("infogain: %d worker(s), pid %d", workers, os.getpid())
    serve(infogain_app(engine, settings, **cfg.batching), settings)
