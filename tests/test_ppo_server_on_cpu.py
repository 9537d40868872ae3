"""The reference policy server's policy and value servers, for real on loopback with tiny random models."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import ThreadServer
from core.serving.app import ServerSettings
from core.serving.local_server import LocalServer
from ppo_server.apps import policy_app, value_app
from ppo_server.clients import PolicyClient, ValueClient
from ppo_server.decoding import DecodeSpec
from ppo_server.policy_engine import PolicyEngine, PolicyModel
from ppo_server.value_engine import ValueEngine, ValueModel

# Lengths below count the prompt too (as max_output_length does): the chat template adds about 25
# tokens of the tiny tokenizer.
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
QUEUE_SAMPLES = 2


def samples(n: int = 8) -> list[dict]:
    """The reference policy server's (question, context, current_node, value) samples with opposite values."""
    return [
        {"question": f"What is {i} plus {i}?", "context": "", "current_node": f"step {i}", "value": (-1.0) ** i}
        for i in range(n)
    ]


def conversations(rows: list[dict]) -> list[list[dict]]:
    return [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["current_node"]}] for r in rows
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def policy(tmp_path_factory, data_root):
    log_dir = tmp_path_factory.mktemp("policy")
    server = LocalServer(
        log_dir,
        "service=policy",
        "model=tiny_lm",
        f"policy.queue.num_samples={QUEUE_SAMPLES}",
        "policy.queue.max_output_length=72",
        f"policy.scratch={log_dir / 'scratch'}",
        f"policy.dataset_roots=[{data_root}]",
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def value(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("value")
    server = LocalServer(log_dir, "service=value", "model=tiny_lm", f"value.scratch={log_dir / 'scratch'}").start()
    yield server
    server.stop()


def test_queued_tasks_are_decoded_in_batches(policy):
    client = PolicyClient(policy.url)
    calls_before = policy.metric("policy_model_calls_total")
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: client.forward(f"Question {i}: what comes next?"), range(20)))
    calls = policy.metric("policy_model_calls_total") - calls_before
    assert len(results) == 20
    for i, body in enumerate(results):
        assert set(body) == {"result", "prompt", "stop_string_found", "is_final_step"}
        assert len(body["result"]) == QUEUE_SAMPLES and all(isinstance(t, str) and t for t in body["result"])
        assert body["prompt"] == [f"Question {i}: what comes next?"] * QUEUE_SAMPLES
    assert 1 <= calls < 20, f"{calls} decode calls for 20 tasks"
    assert httpx.get(f"{policy.url}/health").json()["generate_calls"] >= calls


def test_task_lifecycle_pending_done_then_gone(policy):
    task_id = httpx.post(f"{policy.url}/forward", json={"question": "Hi"}).json()["task_id"]
    first = httpx.get(f"{policy.url}/forward/{task_id}")
    if first.status_code == 202:
        assert first.json() == {"status": "pending", "task_id": task_id}
    result = PolicyClient(policy.url).result(task_id) if first.status_code == 202 else first.json()
    assert len(result["result"]) == QUEUE_SAMPLES
    gone = httpx.get(f"{policy.url}/forward/{task_id}")
    assert gone.status_code == 404 and "unknown task_id" in gone.json()["error"]


@pytest.mark.parametrize("strategy", ["temperature", "beam_search", "diverse_beam_search"])
def test_every_decoding_strategy_returns_the_requested_samples(policy, strategy):
    client = PolicyClient(policy.url)
    direct = client.direct_forward("Once upon a time", num_samples=3, decoding_strategy=strategy, max_output_length=56)
    assert len(direct["result"]) == 3 and len(direct["stop_strings"]) == 3
    queued = client.forward("Once upon a time", decoding_strategy=strategy)
    assert len(queued["result"]) == QUEUE_SAMPLES
    if strategy == "diverse_beam_search":  # the diversity penalty keeps the groups apart
        assert len(set(direct["result"])) == 3


def test_stop_strings_cut_and_are_reported(policy):
    client = PolicyClient(policy.url)
    ask = {"decoding_strategy": "beam_search", "max_output_length": 72, "stop_strings": []}
    full = client.direct_forward("The answer is", **ask)["result"][0]
    stop = full.split()[4]
    cut = client.direct_forward("The answer is", **{**ask, "stop_strings": ["<|eot_id|>", stop]})
    text = cut["result"][0]
    assert cut["stop_strings"] == [stop]
    assert stop not in text and len(text) < len(full) and full.startswith(text.rstrip())


def test_bad_requests_get_seed_codes(policy):
    url = policy.url
    bad_json = httpx.post(f"{url}/forward", content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "invalid JSON" in bad_json.json()["error"]
    wrong_type = httpx.post(f"{url}/direct_forward", json={"input_string": "x", "num_samples": "3"})
    assert wrong_type.status_code == 400 and "num_samples" in wrong_type.json()["error"]
    assert httpx.post(f"{url}/forward", json={}).status_code == 400
    unknown = httpx.post(f"{url}/forward", json={"question": "x", "decoding_strategy": "greedy"})
    assert unknown.status_code == 501 and "greedy" in unknown.json()["error"]
    for huge in ({"num_samples": 10**9}, {"num_samples": -1}, {"max_output_length": 10**9}, {"max_input_length": 0}):
        refused = httpx.post(f"{url}/direct_forward", json={"input_string": "x", **huge})
        assert refused.status_code == 400 and next(iter(huge)) in refused.json()["error"], huge
    missing = httpx.get(f"{url}/forward/0123456789abcdef")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{url}/").json()["status"].startswith("Server is running, ALLOW_TRAINING: True")


def test_dataset_paths_and_loaders_are_allow_listed(policy, data_root, tmp_path):
    url = policy.url
    outside = tmp_path / "samples.jsonl"
    outside.write_text("".join(json.dumps(r) + "\n" for r in samples()))
    refused = httpx.post(f"{url}/train_from_dataset", json={"dataset_path": str(outside)})
    assert refused.status_code == 403 and "outside" in refused.json()["error"]
    escape = httpx.post(f"{url}/train_from_dataset", json={"dataset_path": f"{data_root}/../{outside.name}"})
    assert escape.status_code == 403
    loader = httpx.post(f"{url}/train_from_dataset", json={"dataset": samples(), "dataset_loader_class": "os.system"})
    assert loader.status_code == 400 and "registered loaders" in loader.json()["error"]
    bad_sample = httpx.post(f"{url}/train_from_dataset", json={"dataset": [{"question": "q", "value": "high"}]})
    assert bad_sample.status_code == 400 and "sample 0" in bad_sample.json()["error"]
    inside = data_root / "ok.jsonl"
    inside.write_text(outside.read_text())
    client = PolicyClient(policy.url)
    started = httpx.post(f"{url}/train_from_dataset", json={"dataset_path": str(inside), "percent_of_data": 0.5})
    assert started.status_code == 201 and started.json()["message"].startswith("Training started with")
    report = client.wait_for_training()
    assert report["error"] is None and report["samples"] == 4


def test_training_runs_in_background_then_stop_saves_an_adapter_that_changes_outputs(policy, tiny_model_cfg):
    client = PolicyClient(policy.url)
    rows = [{**r, "GAE": r["value"] * 2} for r in samples()]
    started = client.train_from_dataset(dataset=rows, num_epochs=200, lr=1e-2, save_samples=True)
    second = httpx.post(f"{policy.url}/train_from_dataset", json={"dataset": rows})
    assert second.status_code == 403 and "already running" in second.json()["error"]
    log_file = f"{started['output_dir']}/train_log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for _ in open_or_empty(log_file)) < 2:
        time.sleep(0.1)
    during = client.direct_forward("Still answering?", max_output_length=48)
    assert client.status()["training"] is True and len(during["result"]) == 1
    stopped = client.stop_training()
    assert stopped["message"] == "Training stopped and model saved"
    report = stopped["last_training"]
    assert report["stopped"] is True and report["steps"] >= 1
    status = client.status()
    assert status["stop_training_flag"] is True and status["training"] is False
    with open(report["saved_samples"]) as f:
        assert [json.loads(line) for line in f] == rows

    from peft import PeftModel

    from core.models.loading import build_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_cfg)
    base = build_causal_lm(tiny_model_cfg, tok, torch.device("cpu"))
    ids = tok("What is 1 plus 1?", return_tensors="pt")["input_ids"]
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, report["adapter"])
    after = tuned(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3


def open_or_empty(path: str):
    try:
        return open(path).readlines()
    except FileNotFoundError:
        return []


def test_value_training_lowers_mse(value):
    client = ValueClient(value.url)
    rows = samples()

    def mse() -> float:
        values = client.forward(conversations(rows))["result"]
        return sum((v - r["value"]) ** 2 for v, r in zip(values, rows, strict=True)) / len(rows)

    before = mse()
    assert client.forward(conversations(rows)[0])["result"] == pytest.approx(
        client.forward(conversations(rows)[:1])["result"]
    )
    started = httpx.post(f"{value.url}/train_from_dataset", json={"dataset": rows, "lr": 1e-3, "num_epochs": 30})
    assert started.status_code == 201
    report = client.wait_for_training()
    after = mse()
    assert report["error"] is None and after < before / 4, (before, after)
    bad = httpx.post(f"{value.url}/forward", json={"messages": [1, 2]})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]
    assert client.stop_training()["message"] == "No training is running"


def test_switches_off_answer_403_and_in_process_service_matches_the_client(tiny_model_cfg, tmp_path):
    engine = PolicyModel(tiny_model_cfg, LORA, max_batch_size=8)
    queue = {"num_samples": 2, "max_output_length": 56}
    closed = PolicyEngine(engine, queue=queue, allow_training=False, allow_inference=False, output_dir=str(tmp_path))
    with ThreadServer(policy_app(closed, ServerSettings())) as server:
        for route, body in [
            ("/forward", {"question": "x"}),
            ("/direct_forward", {"input_string": "x"}),
            ("/train_from_dataset", {"dataset": samples()}),
        ]:
            answer = httpx.post(f"{server.url}{route}", json=body)
            assert answer.status_code == 403 and "disabled" in answer.json()["error"], route
    embedded = PolicyEngine(engine, queue=queue, output_dir=str(tmp_path))
    with ThreadServer(policy_app(embedded, ServerSettings())) as server:
        remote = PolicyClient(server.url)
        beams = {"decoding_strategy": "beam_search", "num_samples": 2, "max_output_length": 56}
        assert remote.direct_forward("Same?", **beams) == embedded.direct_forward("Same?", **beams)
        assert set(remote.forward("Same?")) == set(embedded.forward("Same?"))


def test_safe_logits_sample_from_a_diverging_model(tiny_model_cfg):
    engine = PolicyModel(tiny_model_cfg, LORA)
    with torch.no_grad():
        engine.model.get_output_embeddings().weight[:5].fill_(float("nan"))
    spec = DecodeSpec(num_samples=2, max_output_length=44, safe_logits=True)
    assert len(engine.generate(["Hello"], spec)[0]) == 2
    with pytest.raises(RuntimeError):
        engine.generate(["Hello"], DecodeSpec(num_samples=2, max_output_length=44))


def test_value_service_embedded_equals_served(tiny_model_cfg, tmp_path):
    embedded = ValueEngine(ValueModel(tiny_model_cfg, LORA), output_dir=str(tmp_path))
    convs = conversations(samples(3))
    with ThreadServer(value_app(embedded, ServerSettings())) as server:
        served = ValueClient(server.url).forward(convs)["result"]
    assert served == pytest.approx(embedded.forward(convs)["result"])
    assert len(set(served)) == 3


@pytest.mark.parametrize(
    ("name", "phrase"), [("a\x00b.jsonl", "NUL byte"), ("x" * 300 + ".jsonl", "not a usable path")], ids=["nul", "long"]
)
def test_unusable_dataset_paths_get_400_and_the_server_lives(policy, data_root, name, phrase):
    refused = httpx.post(f"{policy.url}/train_from_dataset", json={"dataset_path": f"{data_root}/{name}"})
    assert refused.status_code == 400 and phrase in refused.json()["error"], refused.text
    assert httpx.get(f"{policy.url}/").status_code == 200


def test_value_refuses_roles_chat_templates_do_not_know(value):
    refused = httpx.post(f"{value.url}/forward", json={"messages": [{"role": "x", "content": "hi"}]})
    assert refused.status_code == 400 and "role is one of system, user, assistant, tool" in refused.json()["error"]
