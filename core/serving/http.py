"""A pooled HTTP client for our services and their real-world peers (vLLM, TEI).

One ``httpx.Client`` per base URL keeps connections alive; transient failures (connection
refused, timeouts, 429 and 5xx answers) are retried with exponential backoff; a 4xx answer is
final and raised with the server's own error message. A circuit breaker keeps a dead server
from costing the full retry ladder on every call: once ``breaker_after`` requests in a row have
failed that way, calls fail at once for ``breaker_cooldown_s``; then one attempt probes the
server, and a success closes the circuit.
"""

from __future__ import annotations

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


class HTTPClient:
    """JSON over HTTP with pooling, timeouts, bounded retries and exponential backoff.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``.
        api_key: sent as ``Authorization: Bearer <key>`` when set.
        timeout: seconds for one attempt (connect, read and write each).
        max_retries: extra attempts after the first for transient failures.
        backoff_s: first pause; doubled after each failed attempt.
        max_connections: size of the connection pool.
        breaker_after: requests in a row that failed after their retries before the circuit
            opens (0 = never).
        breaker_cooldown_s: how long an open circuit refuses calls before the next probe.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_connections: int = 100,
        breaker_after: int = 1,
        breaker_cooldown_s: float = 5.0,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.breaker_after, self.breaker_cooldown_s = int(breaker_after), float(breaker_cooldown_s)
        self._failures_in_row = 0
        self._open_until = 0.0
        self._breaker_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def get(self, path: str) -> Any:
        """GET ``path`` and return the decoded JSON body."""
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``path`` and return the decoded JSON body."""
        return self.request("POST", path, payload)

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one request, retrying transient failures; raise ``ServiceError`` when it cannot succeed."""
        attempts = self._attempts_allowed(method, path)
        try:
            result = self._send(method, path, payload, attempts)
        except ServiceError as exc:
            # a 4xx is the caller's mistake from a live server, not a sign the server is down
            self._record(failed=exc.status is None or exc.status in RETRYABLE_STATUS)
            raise
        self._record(failed=False)
        return result

    def _attempts_allowed(self, method: str, path: str) -> int:
        """All attempts while the circuit is closed, one probe once an open circuit cooled down;
        ``ServiceError`` at once while it is open."""
        with self._breaker_lock:
            if not self.breaker_after or self._failures_in_row < self.breaker_after:
                return self.max_retries + 1
            left = self._open_until - time.monotonic()
            if left > 0:
                raise ServiceError(
                    f"{method} {self.base_url}{path}: not sent, the server failed {self._failures_in_row} "
                    f"request(s) in a row (circuit open for {left:.1f}s more)"
                )
            self._open_until = time.monotonic() + self.breaker_cooldown_s  # other threads wait for the probe
            return 1

    def _record(self, failed: bool) -> None:
        with self._breaker_lock:
            if not failed:
                self._failures_in_row = 0
                return
            self._failures_in_row += 1
            if self.breaker_after and self._failures_in_row >= self.breaker_after:
                self._open_until = time.monotonic() + self.breaker_cooldown_s
                log.warning(
                    "%s failed %d request(s) in a row: calls fail at once for %.0fs",
                    self.base_url,
                    self._failures_in_row,
                    self.breaker_cooldown_s,
                )

    def _send(self, method: str, path: str, payload: Any, attempts: int) -> Any:
        last: ServiceError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, path, json=payload)
            except httpx.TransportError as exc:
                last = ServiceError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}")
                log.debug("attempt %d failed: %s", attempt + 1, last)
                continue
            if response.status_code < 400:
                return orjson.loads(response.content) if response.content else None
            last = ServiceError(
                f"{method} {self.base_url}{path} -> HTTP {response.status_code}: {_server_message(response)}",
                status=response.status_code,
            )
            if response.status_code not in RETRYABLE_STATUS:
                break
        raise last

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()
