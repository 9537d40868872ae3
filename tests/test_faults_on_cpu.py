"""Faults at the worst moment, on real processes: a server killed while training, SIGTERM while
requests are in flight, an output dir that cannot be written."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
from PIL import Image

from conftest import SteadyLoad
from core.serving.local_server import LocalServer
from ppo_server.clients import PolicyClient

ROWS = [
    {"question": f"What is {i} plus {i}?", "context": "", "current_node": f"step {i}", "value": 1.0, "GAE": 2.0}
    for i in range(8)
]
BEAMS = {"decoding_strategy": "beam_search", "max_output_length": 40, "stop_strings": []}


def policy_server(tmp_path, output_dir) -> LocalServer:
    return LocalServer(
        tmp_path,
        "service=policy",
        "model=tiny_lm",
        f"policy.output_dir={output_dir}",
        f"policy.scratch={tmp_path / 'scratch'}",
    )


@pytest.mark.slow
def test_policy_server_killed_while_training_restarts_with_its_last_saved_adapter(tmp_path):
    out = tmp_path / "policy-runs"
    with policy_server(tmp_path, out) as first:
        client = PolicyClient(first.url)
        client.train_from_dataset(dataset=ROWS, num_epochs=20, lr=1e-2)
        saved = client.wait_for_training()["adapter"]
        tuned = client.direct_forward("What is 1 plus 1?", **BEAMS)["result"]
        client.train_from_dataset(dataset=ROWS, num_epochs=10_000, lr=1e-2)
        log = out / "training-2" / "train_log.jsonl"
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    # What a kill while saving leaves: a part-written adapter beside the training's log.
    partial = out / "training-2" / "adapter.partial"
    shutil.copytree(saved, partial)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    with policy_server(tmp_path, out) as second:
        client = PolicyClient(second.url)
        status = client.status()
        assert status["training"] is False
        assert status["last_training"] == {"adapter": saved, "restored": True}
        assert not partial.exists()
        assert client.direct_forward("What is 1 plus 1?", **BEAMS)["result"] == tuned  # the saved adapter serves
        started = client.train_from_dataset(dataset=ROWS[:2], num_epochs=1)
        assert started["output_dir"].endswith("training-3")  # nothing earlier is overwritten
        client.wait_for_training()


def _red_square() -> str:
    """A small image as a data URI (the Lewis services read images from requests this way)."""
    out = io.BytesIO()
    Image.new("RGB", (48, 48), "red").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


IMAGE = _red_square()
SLOW_REQUESTS = {
    # service overrides, metric namespace, route, body, concurrent copies: seconds of work
    "llm_judge": (
        ["service=llm_judge", "model=tiny_lm"],
        "generation",
        "/v1/completions",
        {"prompt": "Count:", "max_tokens": 600, "temperature": 0},
        1,
    ),
    "embedding": (
        ["service=embedding"],
        "embedding",
        "/embed",
        {"inputs": ["many words here " * 80] * 32, "truncate": True},
        4,
    ),
    "policy": (
        ["service=policy", "model=tiny_lm"],
        "policy",
        "/direct_forward",
        {"input_string": "Count:", "num_samples": 4, "max_output_length": 600, "stop_strings": []},
        1,
    ),
    "value": (
        ["service=value", "model=tiny_lm"],
        "value",
        "/forward",
        {"messages": [[{"role": "user", "content": "many words here " * 100}]] * 64},
        1,
    ),
    "infogain": (
        [
            "service=infogain",
            "model=tiny_lm",
            "model@ig.generator.model=tiny_lm",
            "entailment@ig.entailment=exact",
            "ig.num_generations=8",
            "ig.max_new_tokens=64",
        ],
        "infogain",
        "/compute_info_gain",
        {"items": [{"question": "What is it?", "context": "It is red.", "answers": ["red"]}] * 4},
        1,
    ),
    "listener": (
        ["service=listener"],
        "listener",
        "/batch_score",
        {"batch": [{"candidate_paths": [IMAGE] * 64, "question": "Is it red?"}] * 8},
        1,
    ),
    "speaker": (
        ["service=speaker", "engine.max_new_tokens=200", "engine.temperature=0"],
        "speaker",
        "/batch_describe",
        {"batch": [{"image_path": IMAGE}] * 8},
        1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("service", list(SLOW_REQUESTS))
def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(tmp_path, service):
    overrides, namespace, route, body, copies = SLOW_REQUESTS[service]
    server = LocalServer(tmp_path, *overrides).start()
    try:
        answers: list[httpx.Response] = []
        answered_at: list[float] = []

        def call():
            answers.append(httpx.post(f"{server.url}{route}", json=body, timeout=120))
            answered_at.append(time.monotonic())

        threads = [threading.Thread(target=call) for _ in range(copies)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.metric(f"{namespace}_in_flight") < copies:
            assert time.monotonic() < deadline and not answers, f"not in flight: {answers}"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
        for thread in threads:
            thread.join(120)
        assert [a.status_code for a in answers] == [200] * copies, answers[-1].text  # finished, not cut off
        assert min(answered_at) > signalled  # they were still running when the signal came
        # uvicorn exits through the signal it caught once the shutdown is done
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_requests_past_the_graceful_time_get_503_not_a_dropped_connection(tmp_path):
    server = LocalServer(tmp_path, "service=llm_judge", "model=tiny_lm", "server.graceful_timeout_s=0.5").start()
    try:
        answer = {}
        body = {"prompt": "Count:", "max_tokens": 1500, "temperature": 0}
        thread = threading.Thread(
            target=lambda: answer.update(r=httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))
        )
        thread.start()
        while server.metric("generation_in_flight") < 1:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert answer["r"].status_code == 503 and "shutting down" in answer["r"].json()["error"]["message"]
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_a_full_disk_fails_the_run_at_start(tmp_path):
    from conftest import run_in_process
    from core.config_errors import ConfigError, config_error_in

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
            filler.write(b"\0" * 128 * 1024)  # fills it: the write stops at No space left on device
        with pytest.raises(Exception) as raised:  # noqa: PT011 - Hydra's instantiate may wrap it
            run_in_process(disk / "run", "experiment=smoke", "logger=none")
        error = config_error_in(raised.value)
        assert isinstance(error, ConfigError) and "No space left on device" in str(error), raised.value
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request_and_gets_traffic_again_once_restarted(tmp_path):
    from core.models.embedding_client import EmbeddingClient

    served = 'embedding_requests_total{route="/embed",status="200"}'
    first, second = LocalServer(tmp_path, "service=embedding"), LocalServer(tmp_path, "service=embedding")
    with first, second:
        client = EmbeddingClient(f"{first.url},{second.url}", timeout=10)  # as EMBEDDING_SERVER_URL lists replicas
        with SteadyLoad(lambda k: client.embed([f"sample {k}", "Paris is the capital of France."]).shape[0]) as load:
            time.sleep(2)
            assert first.metric(served) > 0 and second.metric(served) > 0  # both replicas take requests
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
            before = len(load.done)
            time.sleep(3)
            assert len(load.done) > before  # the survivor carries the load
            restarted = LocalServer(tmp_path, "service=embedding", port=first.port).start()
            try:
                back = time.monotonic()
                while restarted.metric(served) == 0 and time.monotonic() - back < 10:
                    time.sleep(0.2)
                waited = time.monotonic() - back
                assert restarted.metric(served) > 0, "the restarted replica got no traffic"
                assert waited < 5 + 1.5  # within the circuit's cool-down (5 s) and a probe
            finally:
                restarted.stop()
    assert not load.failures, load.failures[:3]
    assert set(load.done) == {2}
