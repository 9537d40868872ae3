"""Run an app with uvicorn: bound to 127.0.0.1 unless configured otherwise, graceful on SIGTERM."""

from __future__ import annotations

import logging
import socket

import uvicorn
from fastapi import FastAPI

from core.config_errors import ConfigError
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


def check_address(settings: ServerSettings) -> None:
    """Fail at once, before any model loads, when ``host:port`` cannot be listened on (a port in
    use, an address this machine does not have), naming the setting to change."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): set server.port= "
                "(or the service's port variable) to a free port, or host= to an address of this machine"
            ) from None
