"""Embeddings over HTTP from any TEI-compatible server (Hugging Face TEI, or ``service=embedding``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.serving.http import HTTPClient, chunks


class EmbeddingClient:
    """Same ``embed`` signature as ``EmbeddingEngine``, one ``POST /embed`` per chunk of texts.

    Args:
        url: server base URL, or several replicas' (a list, or comma-separated): requests spread over them.
        batch_size: texts per request (TEI's default ``max_client_batch_size`` is 32).
        Other args configure the pooled ``HTTPClient``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        batch_size: int = 32,
    ):
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.url = self.http.base_url
        self.batch_size = batch_size

    def embed(
        self,
        texts: Sequence[str],
        normalize: bool = True,
        truncate: bool = True,
        truncation_direction: str = "right",
        dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """A ``(len(texts), dim)`` float32 array; raises ``ServiceError`` when the server cannot answer."""
        parts = []
        for part in chunks(list(texts), self.batch_size):
            body = {
                "inputs": list(part),
                "normalize": normalize,
                "truncate": truncate,
                "truncation_direction": truncation_direction.capitalize(),
            }
            if dimensions is not None:
                body["dimensions"] = dimensions
            if prompt_name is not None:
                body["prompt_name"] = prompt_name
            parts.append(np.asarray(self.http.post("/embed", body), dtype=np.float32))
        if not parts:
            return np.zeros((0, dimensions or 0), dtype=np.float32)
        return np.concatenate(parts, axis=0)

    def info(self) -> dict:
        """The server's ``GET /info``."""
        return self.http.get("/info")

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()
