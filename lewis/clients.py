"""HTTP clients of the listener and speaker services, with the engines' methods.

``ListenerClient`` has the Lewis reference scripts' training-side settings (``listener=remote``
fills them from their ``LISTENER_*`` variables): the URL (the reference scripts point it at
``.../batch_score``; either form works), a timeout, ``chunk_size`` items per request,
``chunk_delay`` seconds between requests, retries and the first pause of the exponential backoff.
A chunk that still fails does not raise: its items come back as ``{"error": reason}`` so a reward can score them 0.0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from core.serving.errors import ServiceError
from core.serving.http import HTTPClient, chunks, server_urls

log = logging.getLogger(__name__)


class ListenerClient:
    """``batch_score`` / ``score`` over HTTP, chunked, paced and retried (``url``, else
    ``http://<host>:<port>``)."""

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 9000,
        timeout: float = 60.0,
        chunk_size: int = 4,
        chunk_delay: float = 0.05,
        max_retries: int = 3,
        backoff_factor: float = 1.0,
        api_key: str | None = None,
    ):
        # the Lewis reference scripts' LISTENER_URL names the route; any URL of a list may
        urls = [u.removesuffix("/batch_score") for u in server_urls(url or f"http://{host}:{port}")]
        self.chunk_size, self.chunk_delay = max(1, int(chunk_size)), float(chunk_delay)
        self.http = HTTPClient(
            urls, api_key=api_key, timeout=float(timeout), max_retries=int(max_retries), backoff_s=float(backoff_factor)
        )
        self.stats = {"requests": 0, "items": 0, "requests_failed": 0}

    def batch_score(self, batch: Sequence[Mapping]) -> dict:
        """``{results, took}`` like the engine; items of a failed chunk are ``{"error": ...}``."""
        started = time.perf_counter()
        results: list[dict] = []
        for n, part in enumerate(chunks(list(batch), self.chunk_size)):
            if n and self.chunk_delay > 0:
                time.sleep(self.chunk_delay)
            self.stats["requests"] += 1
            self.stats["items"] += len(part)
            try:
                results.extend(self.http.post("/batch_score", {"batch": list(part)})["results"])
            except ServiceError as exc:
                self.stats["requests_failed"] += 1
                log.warning(
                    "listener chunk %d:%d failed: %s", n * self.chunk_size, n * self.chunk_size + len(part), exc
                )
                results.extend({"error": str(exc)} for _ in part)
        return {"results": results, "took": round(time.perf_counter() - started, 4)}

    def score(self, candidate_paths: Sequence[str], question: str, topk: int = 1) -> dict:
        """One item (``POST /score``); raises ``ServiceError`` when the service cannot answer."""
        return self.http.post("/score", {"candidate_paths": list(candidate_paths), "question": question, "topk": topk})

    def health(self) -> dict:
        """The service's ``GET /health``."""
        return self.http.get("/health")


class SpeakerClient:
    """``batch_describe`` / ``describe`` over HTTP."""

    def __init__(
        self, url: str | Sequence[str] = "http://127.0.0.1:9001", timeout: float = 300.0, api_key: str | None = None
    ):
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout)

    def batch_describe(self, batch: Sequence[Mapping]) -> dict:
        """``{results: [{text, thinking, coarse, detailed}], took}``."""
        return self.http.post("/batch_describe", {"batch": list(batch)})

    def describe(self, image_path: str, prompt: str | None = None) -> dict:
        """One image."""
        return self.http.post("/describe", {"image_path": image_path, "prompt": prompt})
