"""The shared serving kit over real HTTP: errors, auth, limits, overload, metrics, batching, client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import Request
from pydantic import BaseModel

from conftest import ThreadServer
from core.serving.app import ServerSettings, check_batch_size, create_app
from core.serving.batcher import MicroBatcher
from core.serving.errors import APIError, ServiceError
from core.serving.http import HTTPClient, chunks


class Items(BaseModel):
    items: list[int]


def kit_app(settings: ServerSettings, shutdown_log: list | None = None):
    """create_app plus a few routes that exercise it."""
    app = create_app(
        "kit",
        settings,
        health=lambda: {"model": "none"},
        on_shutdown=[lambda: shutdown_log.append("closed")] if shutdown_log is not None else [],
    )
    attempts = {"n": 0}

    @app.post("/sum")
    async def _sum(req: Items):
        check_batch_size(len(req.items), settings)
        return {"sum": sum(req.items)}

    @app.get("/slow")
    async def _slow():
        await asyncio.sleep(0.5)
        return {"ok": True}

    @app.get("/boom")
    async def _boom():
        raise RuntimeError("kaboom")

    @app.get("/teapot")
    async def _teapot():
        raise APIError(418, "short and stout")

    @app.post("/flaky")
    async def _flaky(request: Request):
        attempts["n"] += 1
        if attempts["n"] % 3:
            raise APIError(503, "try again")
        return {"attempts": attempts["n"]}

    return app


@pytest.fixture(scope="module")
def kit():
    settings = ServerSettings(
        max_body_bytes=2000, max_batch_items=10, max_concurrency=2, max_queue=1, acquire_timeout_s=0.2
    )
    with ThreadServer(kit_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_kit():
    with ThreadServer(kit_app(ServerSettings(api_key="s3cret"))) as server:
        yield server


def test_health_and_metrics(kit):
    # pid: the process that answered (the server runs in this one here)
    assert httpx.get(f"{kit.url}/health").json() == {"status": "ok", "pid": os.getpid(), "model": "none"}
    httpx.post(f"{kit.url}/sum", json={"items": [1, 2]})
    metrics = httpx.get(f"{kit.url}/metrics").text
    assert 'service_requests_total{route="/sum",status="200"} 1.0' in metrics
    assert "service_request_seconds_bucket" in metrics


@pytest.mark.parametrize(
    ("send", "status", "phrase"),
    [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid JSON"),
        (dict(json={"items": "nope"}), 422, "items"),
        (dict(json={"items": [1, "x"]}), 422, "items.1"),
        (dict(json={"items": []}), 422, "cannot be empty"),
        (dict(json={"items": list(range(11))}), 413, "batch size 11 > maximum allowed batch size 10"),
        (dict(json={"items": list(range(1000))}), 413, "request body larger than 2000 bytes"),
    ],
)
def test_bad_input_gets_json_error_and_server_lives(kit, send, status, phrase):
    response = httpx.post(f"{kit.url}/sum", **send)
    assert response.status_code == status
    body = response.json()
    assert phrase in body["error"] and body["code"] == status
    assert httpx.get(f"{kit.url}/health").status_code == 200


def test_chunked_body_over_limit_is_refused(kit):
    def gen():
        for _ in range(10):
            yield b'{"items": [' + b"1," * 150 + b"1]}"

    response = httpx.post(f"{kit.url}/sum", content=gen(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_unknown_route_and_server_errors_are_json(kit):
    missing = httpx.get(f"{kit.url}/nope")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    boom = httpx.get(f"{kit.url}/boom")
    assert boom.status_code == 500 and "kaboom" in boom.json()["error"]
    assert httpx.get(f"{kit.url}/teapot").json() == {
        "error": "short and stout",
        "error_type": "validation",
        "code": 418,
    }
    assert httpx.get(f"{kit.url}/health").status_code == 200


def test_overload_answers_429_and_503_not_a_hang(kit):
    # 2 may run, 1 may queue for 0.2 s: of 6 concurrent half-second requests, 2 succeed,
    # the queued one times out with 503 and the rest are refused at once with 429.
    with ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        codes = sorted(pool.map(lambda _: httpx.get(f"{kit.url}/slow", timeout=5).status_code, range(6)))
        elapsed = time.monotonic() - started
    assert codes.count(200) == 2
    assert 503 in codes and 429 in codes
    assert elapsed < 2.0
    assert httpx.get(f"{kit.url}/health").status_code == 200  # health bypasses the gate


def test_api_key_enforced(keyed_kit):
    assert httpx.get(f"{keyed_kit.url}/health").status_code == 200  # probes need no key
    missing = httpx.post(f"{keyed_kit.url}/sum", json={"items": [1]})
    wrong = httpx.post(f"{keyed_kit.url}/sum", json={"items": [1]}, headers={"Authorization": "Bearer nope"})
    right = httpx.post(f"{keyed_kit.url}/sum", json={"items": [1]}, headers={"Authorization": "Bearer s3cret"})
    assert missing.status_code == wrong.status_code == 401
    assert "API key" in missing.json()["error"]
    assert right.json() == {"sum": 1}
    assert httpx.get(f"{keyed_kit.url}/metrics").status_code == 401


def test_shutdown_hooks_run():
    log: list = []
    with ThreadServer(kit_app(ServerSettings(), shutdown_log=log)):
        pass
    assert log == ["closed"]


def test_client_retries_transient_errors_then_succeeds(kit):
    client = HTTPClient(kit.url, timeout=2, max_retries=3, backoff_s=0.01)
    assert client.post("/flaky", {})["attempts"] % 3 == 0


def test_client_does_not_retry_client_errors(kit):
    client = HTTPClient(kit.url, timeout=2, max_retries=3, backoff_s=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client.post("/sum", {"items": []})
    assert err.value.status == 422 and "cannot be empty" in str(err.value)
    assert time.monotonic() - started < 0.4  # no backoff sleeps


def test_client_gives_up_on_unreachable_server_within_backoff_budget():
    from conftest import free_port

    client = HTTPClient(f"http://127.0.0.1:{free_port()}", timeout=1, max_retries=2, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client.get("/health")
    assert err.value.status is None
    assert time.monotonic() - started < 1.0


def outage_app(state: dict):
    """A server that answers 503 while ``state["down"]`` and counts every request it sees."""
    app = create_app("outage", ServerSettings())

    @app.post("/work")
    async def _work():
        state["seen"] += 1
        if state["down"]:
            raise APIError(503, "down for maintenance")
        return {"ok": True}

    return app


def test_circuit_breaker_fails_fast_while_down_and_probes_after_the_cooldown():
    state = {"down": True, "seen": 0}
    with ThreadServer(outage_app(state)) as server:
        client = HTTPClient(server.url, timeout=2, max_retries=3, backoff_s=0.01, breaker_cooldown_s=0.5)
        for _ in range(10):
            with pytest.raises(ServiceError):
                client.post("/work", {})
        assert state["seen"] == 4  # one request's four attempts; the other nine never left the client
        with pytest.raises(ServiceError, match="circuit open"):
            client.post("/work", {})
        time.sleep(0.6)
        with pytest.raises(ServiceError, match="503"):
            client.post("/work", {})  # the probe: one attempt, and the circuit opens again
        assert state["seen"] == 5
        state["down"] = False
        time.sleep(0.6)
        assert client.post("/work", {}) == {"ok": True}  # the probe succeeds: closed again
        assert client.post("/work", {}) == {"ok": True} and state["seen"] == 7


def test_client_errors_never_open_the_circuit(kit):
    client = HTTPClient(kit.url, timeout=2, max_retries=0)
    for _ in range(3):
        with pytest.raises(ServiceError):
            client.post("/sum", {"items": []})
    assert client.post("/sum", {"items": [1, 2]}) == {"sum": 3}


def test_chunks():
    assert [list(c) for c in chunks([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError):
        list(chunks([1], 0))


def test_micro_batcher_merges_concurrent_requests():
    calls: list[list] = []

    def double(items, key):
        calls.append(list(items))
        time.sleep(0.05)
        return [(key, x * 2) for x in items]

    async def main():
        batcher = MicroBatcher(double, max_batch_size=8, max_wait_ms=20)
        results = await asyncio.gather(
            *(batcher.submit([i, i + 100], key="k") for i in range(10)), batcher.submit([7], key="other")
        )
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results[3] == [("k", 6), ("k", 206)]
    assert results[-1] == [("other", 14)]
    assert max(len(c) for c in calls) <= 8  # never above the batch size
    assert len(calls) < 11  # fewer model calls than requests
    assert all(len({type(x) for x in c}) == 1 for c in calls)


def test_micro_batcher_propagates_errors_and_keeps_working():
    def fn(items, key):
        if "bad" in items:
            raise ValueError("bad item")
        return items

    async def main():
        batcher = MicroBatcher(fn, max_batch_size=4, max_wait_ms=1)
        with pytest.raises(ValueError):
            await batcher.submit(["bad"])
        ok = await batcher.submit(["fine"])
        await batcher.close()
        return ok

    assert asyncio.run(main()) == ["fine"]


def test_concurrent_gate_is_thread_safe_under_load(kit):
    # Many quick requests from many threads: every one answered, none lost or hung.
    errors = []

    def hit(_):
        try:
            return httpx.post(f"{kit.url}/sum", json={"items": [1, 2, 3]}, timeout=5).status_code
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            return None

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(hit, range(40)))
    assert not errors
    assert set(codes) <= {200, 429, 503} and codes.count(200) >= 10
    assert threading.active_count() < 50


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        (b'{"items": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "maximum recursion depth"),  # deep nesting
        (b'{"items": [1, 2], "x": "\xff\xfe"}', 400, "can't decode byte 0xff"),  # not UTF-8
        (b'{"items": [1e999]}', 422, "items.0"),  # inf is not an int
        (b'{"items": [' + b"9" * 5000 + b"]}", 400, "invalid JSON"),  # past Python's 4300-digit limit
        (b'{"items": [1, 2]', 400, "invalid JSON"),  # cut short
        (b"\x00\x01\x02", 400, "invalid JSON"),
    ],
)
def test_hostile_bodies_get_a_4xx_and_the_server_lives(body, status, phrase):
    settings = ServerSettings(max_batch_items=10)
    with ThreadServer(kit_app(settings)) as server:
        response = httpx.post(f"{server.url}/sum", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        assert phrase in response.json()["error"]
        assert httpx.post(f"{server.url}/sum", json={"items": [1, 2]}).json() == {"sum": 3}


def test_slow_loris_body_gets_408_and_holds_no_place_in_the_gate():
    # One place in the gate; a client that sends its body a byte at a time must neither take it
    # nor keep its connection past the body deadline.
    settings = ServerSettings(max_concurrency=1, max_queue=0, body_timeout_s=1.0)
    with ThreadServer(kit_app(settings)) as server, socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"POST /sum HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{")
        started = time.monotonic()
        assert httpx.post(f"{server.url}/sum", json={"items": [4, 5]}, timeout=5).json() == {"sum": 9}
        assert time.monotonic() - started < 0.5
        slow.settimeout(5)
        for _ in range(5):  # keep trickling: the deadline counts from the request's start
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                slow.sendall(b" ")
        answer = slow.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and "not received within 1s" in answer, answer
