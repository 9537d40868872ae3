"""What every request passes: before any route runs, the API key, the body-size limit, a deadline
for the body to arrive, request metrics, and the watch on the client that cancels a request
whose client left (``core.serving.cancel``); once the body is valid, the concurrency limit (429/503
instead of a hang) around the route itself (``gated_route_class``)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.serving.cancel import request_scope
from core.serving.errors import error_body

if TYPE_CHECKING:  # annotations only: the app module imports this one
    from core.serving.app import ServerSettings, ServiceMetrics

# Paths a load balancer or scraper probes: never behind the key (health only) or the concurrency gate.
OPEN_PATHS = frozenset({"/health"})
# Logged as the status of a request whose client left before the answer (nginx's convention).
CLIENT_GONE = 499
UNGATED_PATHS = frozenset({"/health", "/metrics"})


class Overloaded(StarletteHTTPException):
    """No capacity: 429 (queue full) or 503 (waited too long), with ``Retry-After``."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message, headers={"retry-after": "1"})


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on as 413 instead of a generic 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class _BodyTooSlow(StarletteHTTPException):
    """The body did not arrive in time (a slow-loris client): 408, as nginx answers."""

    def __init__(self, timeout_s: float):
        super().__init__(408, f"request body not received within {timeout_s:g}s")


class ConcurrencyGate:
    """At most ``limit`` requests run at once; ``max_queue`` more may wait up to ``timeout_s``.

    A request beyond the queue is refused at once (429); one that waits too long gets 503.
    """

    def __init__(self, limit: int, max_queue: int, timeout_s: float):
        self.limit, self.max_queue, self.timeout_s = limit, max_queue, timeout_s
        self.running = 0
        self.waiting = 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            if self.running < self.limit:
                self.running += 1
                return
            if self.waiting >= self.max_queue:
                raise Overloaded(429, f"server busy: {self.running} running, {self.waiting} queued")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.running < self.limit), self.timeout_s)
            except asyncio.TimeoutError:
                raise Overloaded(503, f"no capacity within {self.timeout_s:g}s; retry later") from None
            finally:
                self.waiting -= 1
            self.running += 1

    async def release(self) -> None:
        async with self._cond:
            self.running -= 1
            self._cond.notify(1)

    @asynccontextmanager
    async def slot(self):
        """Hold one of the ``limit`` places for the block."""
        await self.acquire()
        try:
            yield
        finally:
            await self.release()


def gated_route_class(gate: ConcurrencyGate) -> type[APIRoute]:
    """A route class whose endpoints run inside ``gate``: FastAPI reads and validates the body
    first, so a bad or slowly sent request never holds a place a model call could use."""

    class GatedRoute(APIRoute):
        def __init__(self, path: str, endpoint, **kwargs):
            super().__init__(path, endpoint if path in UNGATED_PATHS else _in_slot(endpoint, gate), **kwargs)

    return GatedRoute


def _in_slot(endpoint, gate: ConcurrencyGate):
    # functools.wraps keeps the endpoint's signature (FastAPI reads its parameters through __wrapped__).
    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def run(*args, **kwargs):
            async with gate.slot():
                return await endpoint(*args, **kwargs)

    else:

        @functools.wraps(endpoint)
        async def run(*args, **kwargs):
            async with gate.slot():
                return await run_in_threadpool(endpoint, *args, **kwargs)

    return run


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    """ASGI middleware: API key, body size and deadline, and request metrics, before any route runs."""

    def __init__(self, app, settings: ServerSettings, metrics: ServiceMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500, "started": False}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        started = time.perf_counter()
        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await _send_json(tracked_send, *refusal)
                return
            if path in UNGATED_PATHS:
                await self.app(scope, self._limited(receive), tracked_send)
                return
            self.metrics.in_flight.inc()
            try:
                if not await self._serve_while_connected(scope, receive, tracked_send):
                    status["code"] = CLIENT_GONE
            finally:
                self.metrics.in_flight.dec()
        except (_BodyTooLarge, _BodyTooSlow) as exc:
            if not status["started"]:
                await _send_json(tracked_send, exc.status_code, error_body(exc.detail, exc.status_code, path=path))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if path not in UNGATED_PATHS else path)
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def _serve_while_connected(self, scope, receive, send) -> bool:
        """Run the app for this request; if the client disconnects first, flag the request
        (``core.serving.cancel``: model loops stop, queued work is dropped) and cancel it.
        False when the client left before the answer."""
        body_read, gone, started, answered = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        limited = self._limited(receive)

        async def app_send(message):
            if message["type"] == "http.response.start":
                started.set()
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()
            await send(message)

        async def app_receive():
            if body_read.is_set():  # after the body only a disconnect can come: the watcher reads it
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await limited()
            if message["type"] != "http.request" or not message.get("more_body"):
                body_read.set()
            if message["type"] == "http.disconnect":
                # the client left while its body was read: FastAPI answers the cut-off body with a
                # 400 no one reads, and the request counts as abandoned, not as a bad one
                flag.set()
                gone.set()
            return message

        with request_scope() as flag:
            served = asyncio.ensure_future(self.app(scope, app_receive, app_send))

            async def watch():
                await body_read.wait()
                if not gone.is_set():
                    await receive()  # returns when the client disconnects (or once the answer is sent)
                    gone.set()
                if not answered.is_set() and not served.done():
                    flag.set()
                    served.cancel()

            watcher = asyncio.ensure_future(watch())
            try:
                await served
                return not flag.is_set()
            except asyncio.CancelledError:
                if flag.is_set():  # the client left: nothing to answer
                    return False
                # The server is stopping and its graceful time ran out: stop this request's work
                # and say so, instead of a dropped connection and a traceback.
                flag.set()
                if not started.is_set():
                    message = "the server is shutting down and could not finish this request in time; retry"
                    await _send_json(send, 503, error_body(message, 503, path=scope["path"]), [(b"retry-after", b"1")])
                return True
            finally:
                watcher.cancel()

    def _refuse(self, scope, path: str):
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and path not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                message = "missing or invalid API key: send 'Authorization: Bearer <key>'"
                return 401, error_body(message, 401, path=path), [(b"www-authenticate", b"Bearer")]
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return 413, error_body(_BodyTooLarge(self.settings.max_body_bytes).detail, 413, path=path)
        return None

    def _limited(self, receive):
        """Count body bytes as they arrive, so chunked uploads cannot exceed the limit either, and
        give the whole body ``body_timeout_s`` to arrive."""
        seen = 0
        deadline = time.monotonic() + self.settings.body_timeout_s

        async def wrapped():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _BodyTooSlow(self.settings.body_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.settings.max_body_bytes:
                    raise _BodyTooLarge(self.settings.max_body_bytes)
            return message

        return wrapped
