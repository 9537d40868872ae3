"""The capability of this package, as a protocol met by its engine, its Ray worker pool and its
client alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class InfoGainScorer(Protocol):
    """InfoGain of contexts: ``InfoGainEngine`` (in this process), ``WorkerPool`` (one engine per
    Ray worker) and ``InfoGainClient`` (the service). Each item is ``{question, answers, context}``;
    each result ``{"score", "error", "details"}``, in order: a bad item gets an ``error``, never
    an exception that loses the others."""

    def compute(self, items: Sequence) -> list[dict]:
        """One result per item."""
        ...

    def health(self) -> dict:
        """Mode, devices, workers and which roles hold random weights."""
        ...
