"""The InfoGain service on loopback: contract, errors, client, reward, Ray workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, free_port
from core.rewards.base import RewardSample
from core.serving.errors import ServiceError
from core.serving.local_server import LocalServer
from infogain.client import InfoGainClient
from infogain.reward import QAExactMatchIG

SMALL = ["ig.num_generations=3", "ig.max_new_tokens=4", "seed=7", "model=tiny_lm", "model@ig.generator.model=tiny_lm"]
ITEMS = [
    {"question": "What is the capital of France?", "context": "Paris is the capital of France.", "answers": ["Paris"]},
    {"question": "Who wrote Hamlet?", "context": "Hamlet is a play by Shakespeare.", "answers": ["Shakespeare"]},
]


def local_engine(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, *overrides])
    return instantiate(cfg.ig)


@pytest.fixture(scope="module")
def ig_server(tmp_path_factory):
    with LocalServer(tmp_path_factory.mktemp("ig"), "service=infogain", *SMALL, "server.max_concurrency=16") as s:
        yield s


def test_contract_and_per_item_errors(ig_server):
    body = httpx.post(
        f"{ig_server.url}/compute_info_gain", json={"items": [ITEMS[0], {"question": "q"}, ITEMS[1]]}, timeout=60
    ).json()
    assert set(body) == {"scores", "errors", "details"}
    assert body["errors"][0] is None and body["errors"][2] is None and "answers" in body["errors"][1]
    assert isinstance(body["scores"][0], float) and body["scores"][1] is None
    details = body["details"][0]
    assert len(details["with_context"]["samples"]) == 3
    assert set(details["no_context"]["samples"][0]) == {"text", "mean_loglik", "length"}
    assert {"resp_entails_ans", "ans_entails_resp", "cluster_ids", "entropy", "sizes"} <= set(details["with_context"])
    assert details["entailment_pairs_checked"] > 0
    health = httpx.get(f"{ig_server.url}/health").json()
    assert health["status"] == "healthy" and health["num_workers"] == 1 and health["device"] == "cpu"


def test_openapi_documents_the_endpoint(ig_server):
    spec = httpx.get(f"{ig_server.url}/openapi.json").json()
    assert "post" in spec["paths"]["/compute_info_gain"]
    assert "items" in spec["components"]["schemas"]["InfoGainRequest"]["properties"]


@pytest.mark.parametrize(
    ("send", "status", "phrase"),
    [
        (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "invalid JSON"),
        (dict(json={"questions": []}), 422, "items"),
        (dict(json={"items": "x"}), 422, "items"),
        (dict(json={"items": []}), 422, "cannot be empty"),
        (dict(json={"items": [ITEMS[0]] * 513}), 413, "maximum allowed batch size 512"),
    ],
)
def test_bad_requests(ig_server, send, status, phrase):
    response = httpx.post(f"{ig_server.url}/compute_info_gain", **send)
    assert response.status_code == status and phrase in response.json()["error"]
    assert httpx.get(f"{ig_server.url}/health").status_code == 200


def test_served_and_in_process_scores_are_identical(ig_server):
    served = InfoGainClient(ig_server.url).compute(ITEMS[:1])
    embedded = local_engine().compute(ITEMS[:1])
    assert served[0]["score"] == pytest.approx(embedded[0]["score"], abs=1e-6)
    assert [s["text"] for s in served[0]["details"]["no_context"]["samples"]] == [
        s["text"] for s in embedded[0]["details"]["no_context"]["samples"]
    ]


def test_concurrent_requests_share_generate_calls(ig_server):
    before = ig_server.metric("infogain_model_calls_total")
    with ThreadPoolExecutor(8) as pool:
        bodies = list(
            pool.map(
                lambda i: httpx.post(
                    f"{ig_server.url}/compute_info_gain", json={"items": [ITEMS[i % 2]]}, timeout=120
                ).json(),
                range(8),
            )
        )
    assert all(b["errors"] == [None] for b in bodies)
    assert ig_server.metric("infogain_model_calls_total") - before < 8


def test_client_fallbacks_when_the_service_is_down():
    dead = f"http://127.0.0.1:{free_port()}"
    zero = InfoGainClient(dead, timeout=1, max_retries=0).compute(ITEMS)
    assert [r["score"] for r in zero] == [0.0, 0.0] and "service unavailable" in zero[0]["error"]
    with pytest.raises(ServiceError):
        InfoGainClient(dead, timeout=1, max_retries=0, fallback="raise").compute(ITEMS)
    local = InfoGainClient(
        dead, timeout=1, max_retries=0, fallback="local", local=local_engine("ig.generator.model.seed=0")
    )
    result = local.compute(ITEMS[:1])
    assert result[0]["error"] is None and local.stats["fallback_items"] == 1


def test_ig_remote_reads_the_reference_env(monkeypatch, ig_server):
    monkeypatch.setenv("IG_SERVICE_URL", ig_server.url)
    monkeypatch.setenv("IG_BATCH_SIZE", "1")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        client = instantiate(compose("config", overrides=["ig=remote"]).ig)
    before = ig_server.metric('infogain_requests_total{route="/compute_info_gain",status="200"}')
    assert len(client.compute(ITEMS)) == 2 and client.batch_size == 1
    assert ig_server.metric('infogain_requests_total{route="/compute_info_gain",status="200"}') - before == 2


def test_em_plus_ig_reward(ig_server):
    client = InfoGainClient(ig_server.url)
    reward = QAExactMatchIG(client, ig_weight=0.6)
    retrieved = (
        "<search>capital</search><information>Paris is the capital of France.</information><answer>Paris</answer>"
    )
    samples = [
        RewardSample(retrieved, ["Paris"], extra_info={"question": ITEMS[0]["question"]}),
        RewardSample("<answer>Paris</answer>", ["Paris"], extra_info={"question": ITEMS[0]["question"]}),
        RewardSample("<answer>Lyon</answer>", ["Paris"], extra_info={"question": ITEMS[0]["question"]}),
    ]
    scores = reward(samples)
    delta = client.compute(
        [{"question": ITEMS[0]["question"], "context": "Paris is the capital of France.", "answers": ["Paris"]}]
    )[0]["score"]
    assert scores[0] == pytest.approx(1.0 + 0.6 * delta, abs=1e-6)
    assert scores[1:] == [1.0, 0.0]  # no <information>: no IG term
    assert reward.stats["ig_items"] == 1


@pytest.mark.slow
def test_two_ray_workers_survive_one_killed_mid_request(tmp_path):
    with LocalServer(
        tmp_path,
        "service=infogain",
        "engine.workers=2",
        *SMALL,
        # tiny models, with enough tokens to keep both workers busy for seconds
        "ig.num_generations=8",
        "ig.max_new_tokens=64",
        "entailment@ig.entailment=exact",
        "server.max_concurrency=16",
    ) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["mode"] == "multi-worker" and health["num_workers"] == 2 and health["devices"] == ["cpu", "cpu"]
        items = [ITEMS[i % 2] for i in range(16)]
        result = {}

        def call():
            result["body"] = httpx.post(f"{server.url}/compute_info_gain", json={"items": items}, timeout=300).json()

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(1.5)  # both workers are computing their halves
        os.kill(health["workers"][0]["pid"], signal.SIGKILL)
        thread.join(timeout=300)
        body = result["body"]
        assert len(body["scores"]) == 16
        assert all(e is None for e in body["errors"]), body["errors"]  # the dead worker's items were redone
        after = httpx.get(f"{server.url}/health").json()
        assert after["num_workers"] == 1 and [w["alive"] for w in after["workers"]] == [False, True]
        again = httpx.post(f"{server.url}/compute_info_gain", json={"items": ITEMS}, timeout=120).json()
        assert again["errors"] == [None, None]


def test_verl_entry_point_reads_the_seed_env(ig_server, monkeypatch):
    from infogain import verl_rewards

    monkeypatch.setenv("IG_SERVICE_URL", ig_server.url)
    verl_rewards._reward.cache_clear()
    try:
        completion = "<information>Paris is the capital of France.</information><answer>Paris</answer>"
        info = {"question": ITEMS[0]["question"]}
        single = verl_rewards.qa_em_ig_compute_score("nq", completion, ["Paris"], info)
        batched = verl_rewards.qa_em_ig_compute_score(
            data_sources=["nq"], solution_strs=[completion], ground_truths=[["Paris"]], extra_infos=[info]
        )
        assert batched == [pytest.approx(single)] and single != 1.0  # EM 1 plus a non-zero IG term
    finally:
        verl_rewards._reward.cache_clear()


def test_costly_items_are_refused_before_any_model_work(ig_server):
    hostile = [
        {"question": "why " * 200000, "context": "", "answers": ["a"]},  # 800 KB question
        {"question": "q?", "context": "", "answers": [f"a{i}" for i in range(2000)]},
        {"question": "q?", "context": "", "answers": ["x" * 5000]},
    ]
    started = time.monotonic()
    body = httpx.post(f"{ig_server.url}/compute_info_gain", json={"items": hostile}, timeout=60).json()
    assert time.monotonic() - started < 10
    assert body["scores"] == [None, None, None]
    assert "800000 characters" in body["errors"][0] and "2000 answers" in body["errors"][1]
    assert "longer than" in body["errors"][2]
    assert httpx.get(f"{ig_server.url}/health").json()["status"] == "healthy"


def test_an_abandoned_request_stops_its_compute(ig_server):
    # Sampling checks between generate calls whether anybody still waits: a client that gives up
    # on a large request does not hold the model for the next one (about 6 s of work here). The
    # questions differ so that neither the prefill nor the entailment cache can share work.
    large = [dict(item, question=f"{item['question']} ({i})") for i in range(96) for item in ITEMS]
    gone_before = ig_server.metric('infogain_requests_total{route="/compute_info_gain",status="499"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{ig_server.url}/compute_info_gain", json={"items": large}, timeout=1.0)
    started = time.monotonic()
    body = httpx.post(f"{ig_server.url}/compute_info_gain", json={"items": ITEMS[:1]}, timeout=120).json()
    waited = time.monotonic() - started
    assert body["errors"] == [None] and len(body["scores"]) == 1
    assert waited < 4.0, waited
    assert ig_server.metric('infogain_requests_total{route="/compute_info_gain",status="499"}') == gone_before + 1
