"""``service=reward``: the whole reward mix behind one endpoint, called by our client, OpenRLHF's own
reward client, verl's reward manager and TRL; merged across requests; failures explicit."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, ThreadServer, free_port, run_in_process
from core.rewards.base import RewardSample
from core.rewards.reward_client import RewardClient
from core.serving.local_server import LocalServer
from core.serving.runner import build_service
from openrlhf_calls import fetch_rewards, reward_executor

QUESTION = "What is the capital of France?"
# (completion, reference): exact, paraphrase, unrelated, and a tagged exact answer
CASES = [
    ("Paris is the capital of France.", "Paris is the capital of France."),
    ("France's capital city is Paris.", "Paris is the capital of France."),
    ("Bananas are rich in potassium.", "Paris is the capital of France."),
    ("<answer>Paris</answer>", "Paris"),
]


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=outputs/composed", *overrides])


def reward_service(*overrides: str) -> ThreadServer:
    """``service=reward`` built from the real config, served by uvicorn in a thread."""
    return ThreadServer(build_service(composed("service=reward", *overrides)))


@pytest.fixture(scope="module")
def full_mix_server(tmp_path_factory):
    """``service=reward reward=default``: exact match + embedding (MiniLM) + LLM judge (SmolLM2,
    logprobs mode), all in the service's process."""
    server = LocalServer(tmp_path_factory.mktemp("reward"), "service=reward", "reward=default").start(timeout=300)
    yield server
    server.stop()


@pytest.mark.slow
def test_the_same_mix_scores_the_same_in_process_and_through_every_client(full_mix_server, smollm2_tokenizer):
    from verl_calls import score_with_verl, verl_config

    samples = [RewardSample(c, ref, QUESTION) for c, ref in CASES]
    in_process = instantiate(composed("reward=default").reward).score(samples)
    assert (
        in_process.total[0] > in_process.total[1] > in_process.total[2]
    )  # real models: exact > paraphrase > unrelated

    ours = RewardClient(full_mix_server.url).score(samples)
    assert ours.total == pytest.approx(in_process.total, abs=1e-4)
    for name in ("exact_match", "embedding", "llm_judge"):
        assert ours.components[name] == pytest.approx(in_process.components[name], abs=1e-4)

    # OpenRLHF: query = prompt + response, labels = the references; each request one sample, as its rollouts send
    executor = reward_executor([f"{full_mix_server.url}/get_reward"])
    answers = fetch_rewards(executor, [QUESTION + c for c, _ in CASES], [QUESTION] * 4, [r for _, r in CASES])
    assert [a["rewards"] for a in answers] == [pytest.approx(in_process.total, abs=1e-4)]
    assert answers[0]["extra_logs"]["llm_judge"] == pytest.approx(in_process.components["llm_judge"], abs=1e-4)

    # verl: its own manager calls the service's entry point with return_dict; the judge's problem via extra_info
    rows = [
        {"data_source": "qa", "response": c, "ground_truth": r, "extra_info": {"problem": QUESTION}} for c, r in CASES
    ]
    config = verl_config(
        "pkg://core.rewards.service_entrypoints",
        "compute_score",
        "naive",
        "+reward.custom_reward_function.reward_kwargs.return_dict=true",
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REWARD_SERVICE_URL", full_mix_server.url)
        from core.rewards.service_entrypoints import service_from_env

        service_from_env.cache_clear()
        verl = score_with_verl(smollm2_tokenizer, config, rows)
        service_from_env.cache_clear()
    assert [r["reward_score"] for r in verl] == pytest.approx(in_process.total, abs=1e-4)
    assert [r["reward_extra_info"]["embedding"] for r in verl] == pytest.approx(
        in_process.components["embedding"], abs=1e-4
    )
    assert all(r["reward_extra_info"]["failed"] == 0 for r in verl)


@pytest.mark.slow
def test_concurrent_single_sample_requests_share_each_components_calls(full_mix_server):
    before = full_mix_server.metric("reward_model_calls_total")
    items_before = full_mix_server.metric("reward_model_items_total")
    client = RewardClient(full_mix_server.url)
    c, ref = CASES[1]
    with ThreadPoolExecutor(32) as pool:  # 32 rollout workers, one sample each
        totals = list(pool.map(lambda k: client.score([RewardSample(f"{c} ({k})", ref, QUESTION)]).total[0], range(32)))
    calls = full_mix_server.metric("reward_model_calls_total") - before
    assert full_mix_server.metric("reward_model_items_total") - items_before == 32
    assert calls <= 4, calls  # each call scores a merged batch with every component once
    assert all(t is not None and t > 0 for t in totals)
    metrics = httpx.get(f"{full_mix_server.url}/metrics").text
    assert 'reward_component_seconds_count{component="llm_judge"}' in metrics


def dead_embedding_mix() -> list[str]:
    """exact match + embedding similarity against an embedding server nobody runs."""
    return [
        "reward=default",
        "~reward.components.llm_judge",
        "embedder=remote",
        f"embedder.url=http://127.0.0.1:{free_port()}",
        "embedder.max_retries=0",
        "embedder.timeout=2",
    ]


def test_a_failed_component_is_null_with_its_reason_and_the_total_follows_on_failure():
    from judges.embedding_reward import lexical_similarity

    samples = [RewardSample("<answer>Paris</answer>", "Paris"), RewardSample("the city of paris", "paris city")]
    lexical = lexical_similarity("the city of paris", "paris city")
    with reward_service(*dead_embedding_mix()) as server:
        client = RewardClient(server.url)
        for policy, expected in {
            "fallback": [1.0 + lexical_similarity("<answer>Paris</answer>", "Paris"), lexical],
            "zero": [1.0, 0.0],
            "skip": [1.0, 0.0],
        }.items():
            scores = client.score(samples, on_failure=policy)
            assert scores.components["embedding"] == [None, None]  # never a silent 0
            assert "embedding server failed" in scores.failures["embedding"][0]
            assert scores.total == pytest.approx(expected), policy
        assert scores.fallbacks["embedding"][1] == pytest.approx(lexical)
        raw = httpx.post(f"{server.url}/score", json={"samples": [{"completion": "x", "ground_truth": "y"}]}).json()
        assert raw["results"][0]["components"]["embedding"] is None and raw["on_failure"] == "fallback"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'reward_component_unscored_total{component="embedding"} 7.0' in metrics
        assert client.failures()["embedding"]["unscored"] == 6


def test_trl_gets_none_for_skipped_components_and_each_component_through_log_metric():
    from core.rewards.service_entrypoints import trl_reward_func, trl_reward_func_async
    from core.training.grpo import RewardRecorder

    with reward_service(*dead_embedding_mix()) as server:
        client = RewardClient(server.url, on_failure="skip")
        logged: dict = {}
        func = trl_reward_func(client)
        completions = ["<answer>Paris</answer>", "<answer>Rome</answer>"]
        totals = func(
            prompts=["q", "q"], completions=completions, answer=["Paris", "Paris"], log_metric=logged.setdefault
        )
        assert totals == [1.0, 0.0] and logged == {"reward_service/exact_match": 0.5}
        import asyncio

        assert asyncio.run(
            trl_reward_func_async(client)(prompts=["q"], completions=completions[:1], answer=["Paris"])
        ) == [1.0]
        # our GRPO recorder: one TRL function per component, None where a component was skipped
        recorder = RewardRecorder(client)
        exact, embedding = recorder.reward_funcs()
        assert exact(prompts=["q"], completions=completions[:1], answer=["Paris"]) == [1.0]
        assert embedding(prompts=["q"], completions=completions[:1], answer=["Paris"]) == [None]
        assert recorder.weights() == [1.0, 1.0]


def test_openrlhf_client_spreads_over_two_services_and_reads_every_component():
    overrides = ("reward=qa_format",)
    with reward_service(*overrides) as first, reward_service(*overrides) as second:
        executor = reward_executor([f"{first.url}/get_reward", f"{second.url}/get_reward"])
        prompt = "Q: capital of France?\n"
        answers = [
            fetch_rewards(executor, [prompt + reply], [prompt], ["Paris"])[0]
            for reply in ("<answer>Paris</answer>", "<answer>Rome</answer>", "Paris", "<answer>paris</answer>")
        ]
        assert [a["rewards"] for a in answers] == [[2.0], [1.0], [1.0], [2.0]]
        assert answers[1]["extra_logs"] == {
            "format": [1.0],
            "exact_match": [0.0],
            "unscored/format": [0.0],
            "unscored/exact_match": [0.0],
        }
        for server in (first, second):  # OpenRLHF rotates its URLs per call: both got two
            assert 'route="/get_reward",status="200"} 2.0' in httpx.get(f"{server.url}/metrics").text


def test_bad_samples_get_a_clear_400_and_never_fail_the_requests_merged_with_them():
    with reward_service("reward=embedding") as server:
        good = {"completion": "Paris is the capital.", "ground_truth": "Paris is the capital of France."}
        bad = {**good, "extra_info": {"length_penalty": "cubic"}}
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda body: httpx.post(f"{server.url}/score", json={"samples": [body]}, timeout=30),
                    [bad, *[good] * 7],
                )
            )
        assert answers[0].status_code == 400 and "length_penalty" in answers[0].json()["error"]
        assert all(a.status_code == 200 and a.json()["results"][0]["score"] > 0.8 for a in answers[1:])
        refused = httpx.post(
            f"{server.url}/score", json={"samples": [{**good, "extra_info": {"server_url": "http://10.0.0.1"}}]}
        )
        assert refused.status_code == 400 and "server_url" in refused.json()["error"]
        assert httpx.post(f"{server.url}/get_reward", json={"query": ["a", "b"], "labels": ["x"]}).status_code == 422


def test_training_against_the_reward_service_equals_training_with_the_mix_in_process(tmp_path):
    fast = ["experiment=smoke", "logger=none", "trainer.max_steps=2", "trainer.save_strategy=no"]
    run_in_process(tmp_path / "local", *fast, "reward=qa_format")
    with LocalServer(tmp_path, "service=reward", "reward=qa_format") as service:
        run_in_process(tmp_path / "remote", *fast, "reward=remote", f"reward.url={service.url}")
        assert service.metric('reward_requests_total{route="/score",status="200"}') >= 2

    def rows(run: str, name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]

    for a, b in zip(rows("local", "samples.jsonl"), rows("remote", "samples.jsonl"), strict=True):
        assert a["completion"] == b["completion"] and a["rewards"] == b["rewards"]
    local, remote = rows("local", "metrics.jsonl"), rows("remote", "metrics.jsonl")
    assert [r["reward/format"] for r in remote] == [r["reward/format"] for r in local]
    assert [r["reward/total"] for r in remote] == pytest.approx([r["reward/total"] for r in local])
    assert Path(tmp_path / "remote" / "adapter").is_dir()
