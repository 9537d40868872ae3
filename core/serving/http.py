"""A pooled HTTP client for our services and their real-world peers (vLLM, TEI), over one
server or several replicas.

One ``httpx.Client`` per server URL keeps connections alive. Each request goes to one server: a
circuit whose cool-down has passed is probed first (so a restarted replica gets traffic back within
``breaker_cooldown_s``), then the healthy server with the fewest requests in flight (ties taken in
turn, request by request). Transient failures (connection refused, timeouts, 429 and 5xx answers)
move the request to the next server at once; when every server was tried it waits (exponential
backoff) and tries again, up to ``max_retries`` extra attempts. A 4xx answer is final and raised
with the server's own message. Each server has its own circuit breaker: once ``breaker_after``
requests in a row failed on it, it gets no requests for ``breaker_cooldown_s``; then one attempt
probes it, and a success closes the circuit.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import httpx
import orjson

from core.serving.errors import ServiceError, error_message

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def server_urls(urls: str | Sequence[str]) -> list[str]:
    """The server URLs of a client setting: one URL, a comma-separated list (as environment
    variables give them, OpenRLHF's style), or a list (YAML).

    >>> server_urls("http://a:1, http://b:2/")
    ['http://a:1', 'http://b:2']
    """
    items = urls.split(",") if isinstance(urls, str) else [str(u) for u in urls or ()]
    out = [u.strip().rstrip("/") for u in items if u and u.strip()]
    if not out:
        raise ValueError(f"no server URL given ({urls!r})")
    for url in out:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
    return out


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "error" in body:
        return error_message(body)
    return str(body)[:300]


class _Server:
    """One server URL: its connection pool, requests in flight and circuit breaker."""

    def __init__(self, url: str, client: httpx.Client):
        self.url, self.client = url, client
        self.in_flight = 0
        self.failures_in_row = 0
        self.open_until = 0.0


class HTTPClient:
    """JSON over HTTP with pooling, timeouts, bounded retries, exponential backoff, and load
    spread over several servers (see the module doc).

    Args:
        base_url: one server (``http://127.0.0.1:8080``), several as a list, or a comma-separated string.
        api_key: sent as ``Authorization: Bearer <key>`` when set.
        timeout: seconds for one attempt (connect, read and write each).
        max_retries: extra attempts after the first for transient failures.
        backoff_s: first pause once every server failed an attempt; doubled after each round.
        max_connections: size of each server's connection pool.
        breaker_after: requests in a row that failed on a server before its circuit opens (0 = never).
        breaker_cooldown_s: how long an open circuit gets no requests before the next probe.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_connections: int = 100,
        breaker_after: int = 1,
        breaker_cooldown_s: float = 5.0,
    ):
        self.urls = server_urls(base_url)
        self.base_url = ",".join(self.urls)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.breaker_after, self.breaker_cooldown_s = int(breaker_after), float(breaker_cooldown_s)
        self._lock = threading.Lock()
        self._turn = itertools.count()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        pool = {
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout),
            "limits": httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        }
        self.servers = [_Server(url, httpx.Client(base_url=url, **pool)) for url in self.urls]

    def get(self, path: str) -> Any:
        """GET ``path`` and return the decoded JSON body."""
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``path`` and return the decoded JSON body."""
        return self.request("POST", path, payload)

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one request, moving to other servers and retrying transient failures; raise
        ``ServiceError`` when it cannot succeed."""
        return self.send(method, path, payload)[0]

    def send(self, method: str, path: str, payload: Any = None, to: str | None = None) -> tuple[Any, str]:
        """``request``, also returning the URL of the server that answered; ``to`` (one of
        ``urls``) sends it to that server only, for state a server keeps (a queued task's id)."""
        pinned = None if to is None else next((s for s in self.servers if s.url == to.rstrip("/")), None)
        if to is not None and pinned is None:
            raise ValueError(f"{to!r} is not one of this client's servers ({self.base_url})")
        failed: set[_Server] = set()  # servers this request failed on (their breakers count it once)
        last: ServiceError | None = None
        attempts, budget = 0, self.max_retries + 1
        try:
            for round_ in itertools.count():
                if attempts >= budget:
                    raise last
                order = [(pinned, False)] if pinned else self._order(probed=round_ > 0)
                if not order:
                    raise last or self._all_open(method, path)
                if round_:
                    time.sleep(self.backoff_s * 2 ** (round_ - 1))
                for server, probe in order:
                    if attempts >= budget:
                        break
                    attempts += 1
                    try:
                        result = self._send(server, method, path, payload)
                    except ServiceError as exc:
                        if exc.status is not None and exc.status not in RETRYABLE_STATUS:
                            failed.discard(server)  # a 4xx is the caller's mistake from a live server
                            self._record(server, failed=False)
                            raise
                        last = exc
                        failed.add(server)
                        if probe:  # a probe has one attempt: its circuit opens again
                            self._record(server, failed=True)
                            failed.discard(server)
                        continue
                    failed.discard(server)
                    self._record(server, failed=False)
                    return result, server.url
        finally:
            for server in failed:
                self._record(server, failed=True)

    def _order(self, probed: bool) -> list[tuple[_Server, bool]]:
        """The servers to try, in order, each with whether it is a probe: servers whose open
        circuit has cooled down first (each probed by one request; not again in a retry round),
        then the closed ones, fewest in flight first, ties in turn."""
        now = time.monotonic()
        turn = next(self._turn)
        n = len(self.servers)
        with self._lock:
            probes, closed = [], []
            for k, server in enumerate(self.servers):
                if not self._is_open(server):
                    closed.append((server.in_flight, (k - turn) % n, server))
                elif server.open_until <= now and not probed:
                    server.open_until = now + self.breaker_cooldown_s  # other requests wait for this probe
                    probes.append(server)
        return [(s, True) for s in probes] + [(s, False) for *_key, s in sorted(closed, key=lambda c: c[:2])]

    def _is_open(self, server: _Server) -> bool:
        return bool(self.breaker_after) and server.failures_in_row >= self.breaker_after

    def _all_open(self, method: str, path: str) -> ServiceError:
        with self._lock:
            left = min(s.open_until for s in self.servers) - time.monotonic()
            failures = max(s.failures_in_row for s in self.servers)
        return ServiceError(
            f"{method} {self.base_url}{path}: not sent, the server failed {failures} "
            f"request(s) in a row (circuit open for {max(left, 0.0):.1f}s more)"
        )

    def _record(self, server: _Server, failed: bool) -> None:
        with self._lock:
            if not failed:
                server.failures_in_row = 0
                return
            server.failures_in_row += 1
            if self._is_open(server):
                server.open_until = time.monotonic() + self.breaker_cooldown_s
                # said once as the circuit opens, not once per request that was in flight then
                (log.warning if server.failures_in_row == self.breaker_after else log.debug)(
                    "%s failed %d request(s) in a row: no requests for %.0fs",
                    server.url,
                    server.failures_in_row,
                    self.breaker_cooldown_s,
                )

    def _send(self, server: _Server, method: str, path: str, payload: Any) -> Any:
        with self._lock:
            server.in_flight += 1
        try:
            response = server.client.request(method, path, json=payload)
        except httpx.TransportError as exc:
            raise ServiceError(f"{method} {server.url}{path}: {type(exc).__name__}: {exc}") from None
        finally:
            with self._lock:
                server.in_flight -= 1
        if response.status_code < 400:
            return orjson.loads(response.content) if response.content else None
        raise ServiceError(
            f"{method} {server.url}{path} -> HTTP {response.status_code}: {_server_message(response)}",
            status=response.status_code,
        )

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per server URL."""
        with self._lock:
            return {s.url: s.in_flight for s in self.servers}

    def close(self) -> None:
        """Close the pooled connections."""
        for server in self.servers:
            server.client.close()
