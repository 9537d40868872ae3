"""The two players of the Lewis game, as protocols met by their engines and clients alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Listener(Protocol):
    """Scores candidate images for a description: ``ListenerEngine`` and ``ListenerClient``.
    An item is ``{candidate_paths, question, topk}``; a result ``{yes_probabilities,
    predicted_index, topk_indices}`` (or ``{"error"}`` from a client whose server failed)."""

    def batch_score(self, batch: Sequence[Mapping]) -> dict:
        """``{results, took}``; an invalid item raises ``ValueError`` naming it."""
        ...

    def score(self, candidate_paths: Sequence[str], question: str, topk: int = 1) -> dict:
        """One item's result."""
        ...


@runtime_checkable
class Speaker(Protocol):
    """Describes a target image: ``SpeakerEngine`` and ``SpeakerClient``. An item is
    ``{image_path, prompt?}``; a result ``{text, thinking, coarse, detailed}``."""

    def batch_describe(self, batch: Sequence[Mapping]) -> dict:
        """``{results, took}``."""
        ...

    def describe(self, image_path: str, prompt: str | None = None) -> dict:
        """One image's description."""
        ...
