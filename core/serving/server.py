"""Run an app with uvicorn: bound to 127.0.0.1 unless configured otherwise, graceful on SIGTERM."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from core.serving.app import ServerSettings

log = logging.getLogger(__name__)


def serve(app: FastAPI, settings: ServerSettings) -> None:
    """Serve ``app`` until interrupted; in-flight requests get ``graceful_timeout_s`` to finish."""
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this host can use it", settings.host)
    log.info("serving %s on http://%s:%d", app.title, settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        access_log=settings.log_level == "debug",
    )
