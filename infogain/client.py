"""``InfoGainClient``: the InfoGain service over HTTP, with the engine's ``compute`` signature.

``ig=remote`` fills its settings from the InfoGain reference service's variables
(``IG_SERVICE_URL``, ``IG_BATCH_SIZE``, ``IG_TIMEOUT``, ``IG_API_KEY``). When the service cannot
answer, ``fallback`` decides:
``local`` computes in this process with an engine built from ``local`` (a config node, built
on first need), ``zero`` scores 0.0 with the reason in ``error``, ``raise`` raises ``ServiceError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from core.serving.errors import ServiceError
from core.serving.http import HTTPClient, chunks

log = logging.getLogger(__name__)


class InfoGainClient:
    """InfoGain over HTTP (``POST /compute_info_gain``), chunked, retried, with a fallback."""

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8000",
        batch_size: int = 512,
        timeout: float = 120.0,
        api_key: str | None = None,
        max_retries: int = 3,
        fallback: str = "zero",
        local=None,
    ):
        if fallback not in ("local", "zero", "raise"):
            raise ValueError(f"fallback must be local, zero or raise, got {fallback!r}")
        if fallback == "local" and local is None:
            raise ValueError("fallback=local needs a local engine (or its config)")
        self.batch_size = int(batch_size)
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.fallback, self._local = fallback, local
        self.stats = {"items": 0, "requests_failed": 0, "fallback_items": 0}

    def _local_engine(self):
        if not hasattr(self._local, "compute"):  # a config node: build the engine on first need
            from hydra.utils import instantiate

            self._local = instantiate(self._local)
        return self._local

    def compute(self, items: list) -> list[dict]:
        """One ``{"score", "error", "details"}`` per item, as the engine returns them."""
        out: list[dict] = []
        self.stats["items"] += len(items)
        for part in chunks(list(items), self.batch_size):
            try:
                body = self.http.post("/compute_info_gain", {"items": list(part)})
                out.extend(
                    {"score": s, "error": e, "details": d}
                    for s, e, d in zip(body["scores"], body["errors"], body["details"], strict=True)
                )
            except ServiceError as exc:
                self.stats["requests_failed"] += 1
                if self.fallback == "raise":
                    raise
                self.stats["fallback_items"] += len(part)
                log.warning("InfoGain service failed (%s); fallback=%s for %d items", exc, self.fallback, len(part))
                if self.fallback == "local":
                    out.extend(self._local_engine().compute(list(part)))
                else:
                    out.extend({"score": 0.0, "error": f"service unavailable: {exc}", "details": None} for _ in part)
        return out

    def health(self) -> dict:
        """The service's ``GET /health``."""
        return self.http.get("/health")
