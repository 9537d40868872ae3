"""Clients of the policy and value servers with the in-process services' methods, so a search
loop or trainer holds ``PolicyEngine``/``ValueEngine`` (embedded) or these (remote) alike.

Errors come back as ``ServiceError`` with the server's status and message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from core.rewards.cache import LRUCache
from core.serving.errors import ServiceError
from core.serving.http import HTTPClient


class _TrainingClient:
    """``status``, ``train_from_dataset`` and ``stop_training`` over HTTP (both servers have them).

    ``url`` may name several replicas (a list, or comma-separated): inference spreads over them;
    training and its status, which are a server's own state, always go to the first.
    """

    def __init__(
        self, url: str | Sequence[str], api_key: str | None = None, timeout: float = 600.0, max_retries: int = 2
    ):
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.trainer_url = self.http.urls[0]

    def status(self) -> dict:
        """``GET /`` of the training server."""
        return self.http.send("GET", "/", to=self.trainer_url)[0]

    def train_from_dataset(self, **fields) -> dict:
        """``POST /train_from_dataset`` with the reference fields (``dataset``, ``dataset_path``, ``lr``, ...)."""
        return self.http.send("POST", "/train_from_dataset", fields, to=self.trainer_url)[0]

    def stop_training(self) -> dict:
        """``POST /stop_training``: returns once the adapter is saved."""
        return self.http.send("POST", "/stop_training", {}, to=self.trainer_url)[0]

    def wait_for_training(self, timeout: float = 600.0, poll_s: float = 0.2) -> dict:
        """Block until no training runs; return ``last_training`` (steps, losses, adapter path)."""
        deadline = time.monotonic() + timeout
        while (status := self.status())["training"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"training still running after {timeout:g}s")
            time.sleep(poll_s)
        return status["last_training"]


class PolicyClient(_TrainingClient):
    """The policy server: queued ``forward`` (submit + poll), ``direct_forward`` and training."""

    def __init__(self, url: str | Sequence[str] = "http://127.0.0.1:12440", poll_s: float = 0.02, **kwargs):
        super().__init__(url, **kwargs)
        self.poll_s = poll_s
        self._task_servers = LRUCache(100_000)  # task id -> the replica that queued it

    def submit(self, question: str, decoding_strategy: str = "temperature", full_simulation: bool = False) -> str:
        """Queue a task (``POST /forward``) on the least busy replica and return its id."""
        body = {"question": question, "decoding_strategy": decoding_strategy, "full_simulation": full_simulation}
        answer, server = self.http.send("POST", "/forward", body)
        self._task_servers.put(answer["task_id"], server)
        return answer["task_id"]

    def fetch(self, task_id: str) -> dict | None:
        """The task's result, or ``None`` while it is pending (``GET /forward/<id>``, asked of the
        replica that queued it)."""
        body = self.http.send("GET", f"/forward/{task_id}", to=self._task_servers.get(task_id))[0]
        return None if body.get("status") == "pending" else body

    def result(self, task_id: str, timeout: float = 600.0) -> dict:
        """Poll until the task is done."""
        deadline = time.monotonic() + timeout
        while (body := self.fetch(task_id)) is None:
            if time.monotonic() > deadline:
                raise ServiceError(f"task {task_id} not done after {timeout:g}s")
            time.sleep(self.poll_s)
        return body

    def forward(self, question: str, decoding_strategy: str = "temperature", full_simulation: bool = False) -> dict:
        """Queue a task and wait for ``{result, prompt, stop_string_found, is_final_step}``."""
        return self.result(self.submit(question, decoding_strategy, full_simulation))

    def direct_forward(self, input_string: str, **fields) -> dict:
        """``POST /direct_forward``: ``{result, stop_strings}``."""
        return self.http.post("/direct_forward", {"input_string": input_string, **fields})


class ValueClient(_TrainingClient):
    """The value server: ``forward(messages)`` and training."""

    def __init__(self, url: str | Sequence[str] = "http://127.0.0.1:12555", **kwargs):
        super().__init__(url, **kwargs)

    def forward(self, messages) -> dict:
        """``POST /forward``: ``{"result": [value, ...]}``."""
        return self.http.post("/forward", {"messages": messages})
