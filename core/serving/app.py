"""The FastAPI app factory every service is built on.

``create_app`` gives a service, in one place: ``/health``, Prometheus ``/metrics``, an optional
Bearer API key, a request-body size limit, a concurrency limit that answers 429/503 on overload
instead of hanging, an error body for every 4xx/5xx in the shape of the route's API family
(OpenAI's on ``/v1/...``, TEI's elsewhere; see ``core.serving.errors.error_body``), the mapping of
an engine's plain exceptions to statuses (``ValueError`` 400, ``PermissionError`` 403,
``LookupError`` 404, ``NotImplementedError`` 501, ``TimeoutError`` 503), and shutdown hooks.
Routes are added by the domain packages on the returned app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.serving.batcher import MicroBatcher
from core.serving.cancel import Abandoned
from core.serving.errors import APIError, error_body
from core.serving.gate import CLIENT_GONE, ConcurrencyGate, RequestGate, gated_route_class
from core.serving.schemas import Health, declare_errors

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """How a service listens and protects itself (the ``server:`` node of every service config)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch_items: int = 1024
    max_concurrency: int = 64
    max_queue: int = 256
    acquire_timeout_s: float = 30.0
    # A request body must arrive within this (a slow-loris client gets 408, holding nothing).
    body_timeout_s: float = 30.0
    # On SIGTERM, requests in flight get this long to finish (then 503): under the 30 s that
    # Kubernetes and Slurm wait before SIGKILL.
    graceful_timeout_s: float = 25.0
    log_level: str = "info"

    @classmethod
    def from_config(cls, node) -> ServerSettings:
        """Build from a mapping (an OmegaConf node or dict); ``None`` values keep the defaults,
        an unknown key is an error."""
        return cls(**{k: v for k, v in dict(node or {}).items() if v is not None})


# How an engine's plain exceptions become statuses, so engines never import HTTP types. The first
# match wins. KeyError and IndexError are LookupErrors too, but in practice they are bugs: 500.
ENGINE_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (Abandoned, CLIENT_GONE),
    (NotImplementedError, 501),
    (PermissionError, 403),
    (TimeoutError, 503),
    (ValueError, 400),
    (LookupError, 404),
)


def engine_error_status(exc: Exception) -> int:
    """The status for an exception raised by engine or route code (500 when none applies).

    >>> engine_error_status(ValueError("bad topk")), engine_error_status(KeyError("x"))
    (400, 500)
    """
    if isinstance(exc, (KeyError, IndexError)):
        return 500
    return next((status for kind, status in ENGINE_ERRORS if isinstance(exc, kind)), 500)


class ServiceMetrics:
    """A per-app Prometheus registry, so several apps in one process never share counters."""

    def __init__(self, namespace: str):
        self.registry = CollectorRegistry()
        self.namespace = namespace
        self.requests = Counter(
            "requests",
            "HTTP requests by route and status",
            ["route", "status"],
            namespace=namespace,
            registry=self.registry,
        )
        self.latency = Histogram(
            "request_seconds", "HTTP request latency", ["route"], namespace=namespace, registry=self.registry
        )
        self.in_flight = Gauge("in_flight", "requests being served", namespace=namespace, registry=self.registry)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        """A counter registered on this app's registry (e.g. items embedded, judge failures)."""
        return Counter(name, doc, list(labels), namespace=self.namespace, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
        """A histogram registered on this app's registry (e.g. items per model call)."""
        return Histogram(name, doc, list(labels), namespace=self.namespace, registry=self.registry, buckets=buckets)


def _validation_message(errors: list[dict]) -> tuple[int, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid JSON body: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def create_app(
    title: str,
    settings: ServerSettings,
    health: Callable[[], dict] | None = None,
    on_shutdown: list[Callable[[], object]] | None = None,
    metrics_namespace: str = "service",
    validation_status: int = 422,
) -> FastAPI:
    """Build a FastAPI app with the shared plumbing; the caller adds its routes.

    ``health()`` adds fields to ``GET /health``; ``on_shutdown`` callables run once when the
    server stops (after in-flight requests finished, within uvicorn's graceful timeout).
    ``validation_status`` is the status of a body with wrong fields or types (422, FastAPI's
    and TEI's; 400 where a contract says so, as the reference policy server does).
    """
    hooks = list(on_shutdown or [])

    @asynccontextmanager
    async def lifespan(_app):
        yield
        for hook in hooks:
            try:
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001 - one failing hook must not stop the others
                log.exception("shutdown hook failed")

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(metrics_namespace)
    app.state.shutdown_hooks = hooks
    app.state.gate = ConcurrencyGate(settings.max_concurrency, settings.max_queue, settings.acquire_timeout_s)
    app.router.route_class = gated_route_class(app.state.gate)
    app.add_middleware(RequestGate, settings=settings, metrics=app.state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(req: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.status, exc.error_type, req.url.path), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the body: say why
            message = f"invalid JSON body: {exc.__cause__}"
        return JSONResponse(
            error_body(message, exc.status_code, path=req.url.path),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(req: Request, exc: RequestValidationError):
        status, message = _validation_message(list(exc.errors()))
        status = validation_status if status == 422 else status
        return JSONResponse(error_body(message, status, path=req.url.path), status_code=status)

    async def _engine_error(req: Request, exc: Exception):
        status = engine_error_status(exc)
        if status == 500:
            return await _server_error(req, exc)
        return JSONResponse(error_body(str(exc), status, path=req.url.path), status_code=status)

    # Handlers by class run inside the app, so the connection stays usable after them.
    for kind, _status in ENGINE_ERRORS:
        app.add_exception_handler(kind, _engine_error)

    @app.exception_handler(Exception)
    async def _server_error(req: Request, exc: Exception):
        log.exception("unhandled error")
        message = f"internal error: {type(exc).__name__}: {exc}"
        # Starlette re-raises what reaches this handler and uvicorn then drops the connection:
        # say so, or a keep-alive client sends its next request into a closed socket.
        return JSONResponse(
            error_body(message, 500, path=req.url.path), status_code=500, headers={"connection": "close"}
        )

    @app.get("/health", responses={200: {"model": Health}})
    async def _health():
        # the process that answered: which replica, behind a load balancer or Ray Serve
        return {"status": "ok", "pid": os.getpid(), **(health() if health else {})}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def _metrics():
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = declare_errors(spec)
        return app.openapi_schema

    app.openapi = openapi
    return app


def batch_metrics(app: FastAPI, max_batch_size: int) -> Callable[[int], None]:
    """``on_batch(n_items)``, counting the app's model calls in ``/metrics`` (under the app's
    namespace): ``model_calls_total`` (one per merged batch), ``model_items_total`` (items that
    reached the model) and the ``batch_items`` histogram."""
    metrics: ServiceMetrics = app.state.metrics
    calls = metrics.counter("model_calls", "model calls (one per merged batch)")
    items = metrics.counter("model_items", "items that went through the model")
    buckets = tuple(2**k for k in range(max(1, max_batch_size).bit_length() + 1))
    sizes = metrics.histogram("batch_items", "items per model call", buckets)

    def on_batch(n: int) -> None:
        calls.inc()
        items.inc(n)
        sizes.observe(n)

    return on_batch


def add_batcher(app: FastAPI, fn, max_batch_size: int, max_wait_ms: float) -> MicroBatcher:
    """A micro-batcher for the app's model, counted in ``/metrics`` (``batch_metrics``) and
    stopped at shutdown."""
    batcher = MicroBatcher(fn, max_batch_size, max_wait_ms, on_batch=batch_metrics(app, max_batch_size))
    app.state.shutdown_hooks.append(batcher.close)
    return batcher


def check_batch_size(n: int, settings: ServerSettings, what: str = "items", limit: int | None = None) -> None:
    """Refuse empty batches (422) and batches over ``limit`` (default ``max_batch_items``; 413), with the reason."""
    limit = settings.max_batch_items if limit is None else limit
    if n == 0:
        raise APIError(422, f"`{what}` cannot be empty", "empty")
    if n > limit:
        raise APIError(413, f"batch size {n} > maximum allowed batch size {limit}", "validation")
