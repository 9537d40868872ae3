"""``service=policy`` and ``service=value``: the reference policy server's servers on the shared serving kit.

Policy (``PolicyEngine``):

* ``GET /`` → ``{status, allow_training, stop_training_flag, allow_inference, training, last_training}``.
* ``POST /forward`` ``{question, decoding_strategy, full_simulation}`` → 201 ``{task_id}``. A worker
  drains the queue in batches: tasks with the same decoding share one decode call.
* ``GET /forward/<task_id>`` → 200 ``{result, prompt, stop_string_found, is_final_step}`` once
  done (the result is then removed); **202** ``{status: "pending", task_id}`` while queued or
  running; 404 for an unknown (or already fetched, or expired) id; 500 if its decode failed.
  Finished results are kept ``results_ttl_s`` seconds; at most ``max_tasks`` are held (429 beyond).
* ``POST /direct_forward`` → ``{result, stop_strings}``.
Value (``ValueEngine``): ``GET /``, ``POST /forward`` ``{messages}`` → ``{result: [float]}``.
Both: ``POST /train_from_dataset`` → 201 ``{message}``, ``POST /stop_training`` → 200 ``{message}``.

Errors are ``{"error": ...}`` with the reference policy server's codes: 400 for a bad body (invalid JSON, wrong
types, missing fields), 403 (switched off, training already running, path outside the roots),
404 (unknown task), 501 (unknown decoding strategy).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, WithJsonSchema

from core.serving.app import ServerSettings, add_batcher, create_app
from core.serving.errors import APIError
from ppo_server.decoding import STRATEGIES
from ppo_server.policy_engine import PolicyEngine
from ppo_server.training import TrainingEngine
from ppo_server.value_engine import ValueEngine

log = logging.getLogger(__name__)


class _Body(BaseModel):
    # The reference policy server's clients send JSON types as documented: "3" is not an int here.
    model_config = ConfigDict(strict=True)


# Documented as the implemented strategies; any other name gets the contract's 501, not a 400.
Strategy = Annotated[str, WithJsonSchema({"type": "string", "enum": list(STRATEGIES), "default": "temperature"})]


class ForwardRequest(_Body):
    """``POST /forward`` (policy)."""

    question: str | None = None
    decoding_strategy: Strategy = "temperature"
    full_simulation: bool = False


class DirectForwardRequest(_Body):
    """``POST /direct_forward``, with the reference defaults (``max_output_length``: max_input_length + 256)."""

    input_string: str | None = None
    safe_logits: bool = False
    num_samples: int = 1
    temperature: float = 0.7
    max_input_length: int = 1024
    max_output_length: int | None = None
    decoding_strategy: Strategy = "temperature"
    stop_strings: list[str] = ["<|eot_id|>", "<|eois_id|>"]
    skip_special_tokens: bool = True


class TrainRequest(_Body):
    """``POST /train_from_dataset``; ``dataset_loader_class`` names a registered loader."""

    dataset: list | None = None
    dataset_path: str | None = None
    dataset_loader_class: str | None = None
    num_epochs: int = 1
    percent_of_data: float = 1.0
    save_samples: bool = False
    lr: float = 1e-5


class ValueForwardRequest(_Body):
    """``POST /forward`` (value): one conversation, or a list of conversations."""

    messages: list | None = None


class Status(BaseModel):
    """``GET /``: the reference policy server's flags, and whether (and how) training ran."""

    model_config = ConfigDict(extra="allow")
    status: str
    allow_training: bool
    stop_training_flag: bool
    allow_inference: bool
    training: bool
    last_training: dict | None


class Message(BaseModel):
    """``/train_from_dataset`` and ``/stop_training`` answers."""

    model_config = ConfigDict(extra="allow")
    message: str


class TaskId(BaseModel):
    """``POST /forward`` (policy): the id to fetch the result with."""

    task_id: str


class Pending(BaseModel):
    """``GET /forward/<task_id>`` while the task is queued or running (202)."""

    status: Literal["pending"]
    task_id: str


class Forwarded(BaseModel):
    """``GET /forward/<task_id>`` once done: one entry per sample."""

    result: list[str]
    prompt: list[str]
    stop_string_found: list[str | None]
    is_final_step: list[bool]


class DirectForwarded(BaseModel):
    """``POST /direct_forward``: the samples and the stop string each ended at (``null``: none)."""

    result: list[str]
    stop_strings: list[str | None]


class Values(BaseModel):
    """``POST /forward`` (value): one value per conversation."""

    result: list[float]


class TaskStore:
    """Queued tasks and their results, bounded in number; unfetched results expire after ``ttl_s``."""

    def __init__(self, max_tasks: int, ttl_s: float):
        self.max_tasks, self.ttl_s = max_tasks, ttl_s
        self._tasks: OrderedDict[str, dict] = OrderedDict()

    def add(self) -> str:
        """A new pending task's id (429 when the store is full of unfetched work)."""
        self._expire()
        if len(self._tasks) >= self.max_tasks:
            raise APIError(429, f"{len(self._tasks)} tasks are queued or unfetched; fetch results or retry later")
        task_id = uuid.uuid4().hex
        self._tasks[task_id] = {"state": "pending"}
        return task_id

    def finish(self, task_id: str, body: dict | None, error: str | None = None) -> None:
        """Record a task's result (or its error); the TTL starts now."""
        self._tasks[task_id] = {"state": "error" if error else "done", "body": body, "error": error, "at": time.time()}

    def take(self, task_id: str) -> dict:
        """The task's entry; a finished one is removed (results are handed out once)."""
        self._expire()
        entry = self._tasks.get(task_id)
        if entry is None:
            raise APIError(404, f"unknown task_id {task_id!r} (never queued, already fetched, or expired)")
        if entry["state"] != "pending":
            del self._tasks[task_id]
        return entry

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        for task_id in [k for k, v in self._tasks.items() if v["state"] != "pending" and v["at"] < cutoff]:
            del self._tasks[task_id]


def _add_training_routes(app: FastAPI, service: TrainingEngine) -> None:
    @app.get("/", responses={200: {"model": Status}})
    async def _status():
        return service.status()

    @app.post("/train_from_dataset", status_code=201, responses={201: {"model": Message}})
    def _train(req: TrainRequest):
        return service.train_from_dataset(**req.model_dump())

    @app.post("/stop_training", responses={200: {"model": Message}})
    def _stop():
        return service.stop_training()


def policy_app(
    service: PolicyEngine,
    settings: ServerSettings,
    max_batch_size: int = 32,
    max_wait_ms: float = 20.0,
    max_tasks: int = 10000,
    results_ttl_s: float = 600.0,
) -> FastAPI:
    """The policy server over ``service``."""
    engine = service.adapter
    app = create_app(
        "policy",
        settings,
        metrics_namespace="policy",
        validation_status=400,
        health=lambda: {"generate_calls": engine.generate_calls, "training": service.training},
    )
    _add_training_routes(app, service)
    batcher = add_batcher(app, service.forward_batch, max_batch_size, max_wait_ms)
    store = TaskStore(max_tasks, results_ttl_s)
    running: set[asyncio.Task] = set()

    async def work(task_id: str, question: str, spec) -> None:
        try:
            (body,) = await batcher.submit([question], key=spec)
            store.finish(task_id, body)
        except Exception as exc:  # noqa: BLE001 - kept for the client's GET
            log.exception("task %s failed", task_id)
            store.finish(task_id, None, f"{type(exc).__name__}: {exc}")

    @app.post("/forward", status_code=201, responses={201: {"model": TaskId}})
    async def _forward(req: ForwardRequest):
        if req.question is None or not req.question:
            raise APIError(400, "'question' is required")
        spec = service.task_spec(req.decoding_strategy, req.full_simulation)
        service.check_inference()
        task_id = store.add()
        job = asyncio.create_task(work(task_id, req.question, spec))
        running.add(job)
        job.add_done_callback(running.discard)
        return {"task_id": task_id}

    @app.get("/forward/{task_id}", responses={200: {"model": Forwarded}, 202: {"model": Pending}})
    async def _fetch(task_id: str):
        entry = store.take(task_id)
        if entry["state"] == "pending":
            return JSONResponse({"status": "pending", "task_id": task_id}, status_code=202)
        if entry["state"] == "error":
            raise APIError(500, f"task {task_id} failed: {entry['error']}")
        return entry["body"]

    @app.post("/direct_forward", responses={200: {"model": DirectForwarded}})
    def _direct(req: DirectForwardRequest):
        return service.direct_forward(**req.model_dump())

    return app


def value_app(service: ValueEngine, settings: ServerSettings) -> FastAPI:
    """The value server over ``service``."""
    app = create_app(
        "value",
        settings,
        metrics_namespace="value",
        validation_status=400,
        health=lambda: {"training": service.training},
    )
    _add_training_routes(app, service)

    @app.post("/forward", responses={200: {"model": Values}})
    def _forward(req: ValueForwardRequest):
        return service.forward(req.messages)

    return app
