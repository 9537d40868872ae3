"""The capabilities of this package (text generation, embedding), as protocols met by their engines
and by their clients alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from core.models.generation import Completion, Message, SamplingParams


@runtime_checkable
class TextGenerator(Protocol):
    """Completions for prompts and chat conversations: ``params.n`` of them per input, cut at the
    first of ``stop``; ``name`` is the model's. A failure raises ``ValueError`` (bad input) or, for
    a remote server, ``core.serving.ServiceError``."""

    name: str

    def complete(
        self, prompts: Sequence[str], params: SamplingParams = ..., stop: Sequence[str] | None = None
    ) -> list[list[Completion]]: ...

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams = ...,
        stop: Sequence[str] | None = None,
        enable_thinking: bool | None = None,
    ) -> list[list[Completion]]: ...


@runtime_checkable
class Embedder(Protocol):
    """Text embeddings: ``EmbeddingEngine`` (sentence-transformers in this process) and
    ``EmbeddingClient`` (any TEI-compatible server). Bad input raises ``ValueError``; a remote
    server that cannot answer raises ``core.serving.ServiceError``."""

    def embed(
        self,
        texts: Sequence[str],
        normalize: bool = True,
        truncate: bool = True,
        truncation_direction: str = "right",
        dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """A ``(len(texts), dim)`` float32 array."""
        ...

    def info(self) -> dict:
        """The model's id, dimension and limits (TEI's ``/info``)."""
        ...
