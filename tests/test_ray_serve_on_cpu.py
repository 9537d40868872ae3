"""``serve=ray``: a service as a Ray Serve deployment with two replicas on a local Ray instance: the
same app in each (routes, errors), requests spread over both, a replica killed under load is
replaced with no failed request, and SIGTERM leaves no Ray process behind."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from conftest import SteadyLoad
from core.models.embedding_client import EmbeddingClient
from core.serving.local_server import LocalServer


def replica_pids(url: str, asks: int = 30) -> set[int]:
    return {httpx.get(f"{url}/health", timeout=10).json()["pid"] for _ in range(asks)}


@pytest.mark.slow
def test_two_serve_replicas_share_the_load_survive_a_kill_and_stop_cleanly(tmp_path):
    server = LocalServer(tmp_path, "service=embedding", "serve=ray", "serve.replicas=2").start(timeout=240)
    try:
        launcher = psutil.Process(server.proc.pid)
        deadline = time.monotonic() + 120
        while len(pids := replica_pids(server.url)) < 2 and time.monotonic() < deadline:
            time.sleep(1)  # the second replica may still be loading its model
        assert len(pids) == 2, pids  # Ray's proxy spreads requests over both replicas
        bad = httpx.post(f"{server.url}/embed", json={"inputs": []}, timeout=10)
        assert bad.status_code == 422 and bad.json() == {
            "error": "`inputs` cannot be empty",
            "error_type": "empty",
            "code": 422,
        }  # the app's own answer, from inside a replica
        client = EmbeddingClient(server.url, timeout=30)
        text = "Paris is the capital of France."
        with SteadyLoad(lambda k: client.embed([f"text {k}", text]).shape, threads=3) as load:
            time.sleep(2)
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 90
            while not (replica_pids(server.url, 10) - pids) and time.monotonic() < deadline:
                time.sleep(1)  # Ray starts a replacement replica
            replaced = replica_pids(server.url) - pids
            time.sleep(1)
        assert replaced, "no replacement replica"
        assert not load.failures, load.failures[:3]
        assert len(load.done) > 10
        family = launcher.children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running())
    finally:
        server.stop()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:2] for p in alive]
    assert server.proc.returncode == 0
