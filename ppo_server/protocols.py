"""The policy and the value model, as protocols met by their engines (in this process) and by
their clients (over the policy and value servers' routes) alike."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Trainable(Protocol):
    """Background training of a LoRA adapter that can be stopped and saved."""

    def status(self) -> dict:
        """``{training, last_training, ...}`` (the servers' ``GET /``)."""
        ...

    def train_from_dataset(self, **fields) -> dict:
        """Start training on ``dataset`` or ``dataset_path`` (``lr``, ``num_epochs``, ...)."""
        ...

    def stop_training(self) -> dict:
        """Stop the training in progress and save the adapter."""
        ...

    def wait_for_training(self, timeout: float = 600.0) -> dict | None:
        """Block until no training runs; the last training's summary."""
        ...


@runtime_checkable
class Policy(Trainable, Protocol):
    """Answers questions: ``PolicyEngine`` and ``PolicyClient``."""

    def forward(self, question: str, decoding_strategy: str = "temperature", full_simulation: bool = False) -> dict:
        """``{result, prompt, stop_string_found, is_final_step}`` for one question."""
        ...

    def direct_forward(self, input_string: str, **fields) -> dict:
        """``{result, stop_strings}``: decode ``input_string`` now with the given settings."""
        ...


@runtime_checkable
class Value(Trainable, Protocol):
    """Scores conversations: ``ValueEngine`` and ``ValueClient``."""

    def forward(self, messages) -> dict:
        """``{"result": [value, ...]}`` for one conversation or a list of them."""
        ...
