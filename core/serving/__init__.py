"""The serving kit every service is built on.

``create_app`` (health, metrics, API key, body and concurrency limits, error shapes, and the
mapping of engine exceptions to statuses), ``serve`` (uvicorn, graceful), ``run_service`` (any
``service=`` config), ``MicroBatcher``, the pooled ``HTTPClient`` every client uses, request
paths confined to allowed roots, and ``LocalServer`` (a real server in a subprocess).
"""

from core.serving.app import ServerSettings, add_batcher, check_batch_size, create_app
from core.serving.batcher import MicroBatcher
from core.serving.errors import APIError, ServiceError, error_body, error_message
from core.serving.http import HTTPClient, chunks
from core.serving.local_server import LocalServer, free_port
from core.serving.runner import run_service
from core.serving.server import serve

__all__ = [
    "APIError",
    "HTTPClient",
    "LocalServer",
    "MicroBatcher",
    "ServerSettings",
    "ServiceError",
    "add_batcher",
    "check_batch_size",
    "chunks",
    "create_app",
    "error_body",
    "error_message",
    "free_port",
    "run_service",
    "serve",
]
