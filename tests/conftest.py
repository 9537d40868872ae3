"""Shared fixtures: real servers on loopback (subprocesses started through run.py, or threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request

from core.serving.local_server import ROOT, LocalServer, free_port

JUDGE_KEY = "test-judge-key"


def run_in_process(run_dir: Path, *overrides: str):
    """The task ``python run.py <overrides>`` runs, composed and run in this process with
    ``run_dir`` as its run directory (no interpreter start-up: seconds saved per run); returns
    what the task returns."""
    from hydra import compose, initialize_config_dir

    from core.tasks import run_task

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.output_dir={run_dir}"])
    return run_task(cfg)


def run_cli(*overrides: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run ``python run.py <overrides>`` and return the finished process (stdout+stderr in .stdout)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides],
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def embedding_server(tmp_path_factory) -> Iterator[LocalServer]:
    """``service=embedding`` with the packaged MiniLM, no API key."""
    server = LocalServer(tmp_path_factory.mktemp("embedding"), "service=embedding").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def judge_server(tmp_path_factory) -> Iterator[LocalServer]:
    """``service=llm_judge`` with the tiny random Qwen2 (fast API tests), protected by ``JUDGE_KEY``."""
    server = LocalServer(
        tmp_path_factory.mktemp("judge"),
        "service=llm_judge",
        "model=tiny_lm",
        env={"LLM_JUDGE_SERVER_API_KEY": JUDGE_KEY},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory) -> Iterator[LocalServer]:
    """``service=llm_judge`` as users start it: the real SmolLM2-135M-Instruct, no API key."""
    server = LocalServer(tmp_path_factory.mktemp("smollm2"), "service=llm_judge").start(timeout=300)
    yield server
    server.stop()


class ThreadServer:
    """A uvicorn server for an app, in a thread of the test process."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("thread server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class SteadyLoad:
    """``threads`` threads calling ``call(k)`` (k counts the calls) back to back until the block
    ends; what each returned goes to ``done``, what each raised to ``failures``."""

    def __init__(self, call, threads: int = 4):
        self.call, self.done, self.failures = call, [], []
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.done.append(self.call(len(self.done)))
            except Exception as exc:  # noqa: BLE001 - gathered: a test asserts there are none
                self.failures.append(exc)

    def __enter__(self) -> SteadyLoad:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=60)


@pytest.fixture(scope="session")
def tiny_model_cfg() -> dict:
    """The tiny random Qwen2 config from conf/model/tiny_lm.yaml, as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_lm.yaml"))


@pytest.fixture(scope="session")
def smollm2_cfg() -> dict:
    """The packaged SmolLM2-135M-Instruct's model config, as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/smollm2-135m.yaml"), resolve=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_cfg):
    """SmolLM2's tokenizer (a real byte-level BPE: text survives encode/decode unchanged)."""
    from core.models.loading import load_tokenizer

    return load_tokenizer(smollm2_cfg)


def scripted_openai_app(replies: dict[str, str], default: str, seen: list[dict]):
    """A stand-in for a vLLM OpenAI server (an external service): the chat reply is the first
    ``replies`` value whose key occurs in the prompt, else ``default``; request bodies go to ``seen``."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "Qwen/Qwen3-32B", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        prompt = body["messages"][-1]["content"]
        text = next((v for k, v in replies.items() if k in prompt), default)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for i in range(body.get("n", 1))
        ]
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app
