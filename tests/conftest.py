"""Shared fixtures: real servers on loopback (subprocesses started through run.py, or threads)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parents[1]
JUDGE_KEY = "test-judge-key"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*overrides: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run ``python run.py <overrides>`` and return the finished process (stdout+stderr in .stdout)."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


class ServerProcess:
    """``python run.py service=... server.port=<free>`` in a subprocess, stopped with SIGTERM."""

    def __init__(self, tmp: Path, *overrides: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        args = [sys.executable, str(ROOT / "run.py"), *overrides, f"server.port={self.port}",
                f"hydra.run.dir={tmp / f'run-{self.port}'}"]
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metric(self, name: str, headers: dict | None = None) -> float:
        """The value of one unlabelled Prometheus sample from ``/metrics``."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{name} not in /metrics")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture(scope="session")
def embedding_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """``service=embedding`` with the packaged MiniLM, no API key."""
    server = ServerProcess(tmp_path_factory.mktemp("embedding"), "service=embedding").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def judge_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """``service=llm_judge`` with the tiny random Qwen2, protected by ``JUDGE_KEY``."""
    server = ServerProcess(tmp_path_factory.mktemp("judge"), "service=llm_judge",
                           env={"LLM_JUDGE_SERVER_API_KEY": JUDGE_KEY}).wait_ready()
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


@pytest.fixture(scope="session")
def tiny_model_cfg() -> dict:
    """The tiny random Qwen2 config from conf/model/tiny_lm.yaml, as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_lm.yaml"))


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
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                   for i in range(body.get("n", 1))]
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app
