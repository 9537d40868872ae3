"""The real SmolLM2-135M-Instruct in every language-model role: the served judge with the official
``openai`` client, the judge's scores by kind, end ids, the policy server's prompt format and
stops, PPO on LoRA, and InfoGain on contexts that do or do not hold the answer."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import ROOT, run_cli
from core.models.generation import SamplingParams
from core.models.generation_client import GenerationClient
from core.models.generation_engine import GenerationEngine
from core.models.loading import end_token_ids
from core.rewards.base import RewardSample
from core.serving.local_server import LocalServer
from judges.llm_judge import LLMJudgeReward
from ppo_server.clients import PolicyClient
from ppo_server.policy_engine import PolicyModel
from ppo_server.samples import parse_sample

pytestmark = pytest.mark.slow
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def oai(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="none", max_retries=0)


def test_served_smollm2_answers_with_logprobs_to_the_official_client(oai, smollm2_server):
    assert [m.id for m in oai.models.list().data] == [SMOLLM2]
    assert httpx.get(f"{smollm2_server.url}/health").json()["random_weights"] is False
    ask = dict(model=SMOLLM2, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=64)
    reply = oai.chat.completions.create(**ask, logprobs=True, top_logprobs=3).choices[0]
    assert "Paris" in reply.message.content and reply.finish_reason == "stop"  # ended at <|im_end|>, not at 64 tokens
    tokens = reply.logprobs.content
    assert 1 < len(tokens) < 64 and "".join(t.token for t in tokens).startswith(reply.message.content.strip()[:10])
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy takes the likeliest
    streamed = "".join(
        c.choices[0].delta.content or "" for c in oai.chat.completions.create(**ask, stream=True) if c.choices
    )
    assert streamed == reply.message.content
    plain = oai.completions.create(
        model=SMOLLM2, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    assert len(plain.choices[0].logprobs.tokens) == 3 and all(
        len(t) == 2 for t in plain.choices[0].logprobs.top_logprobs
    )
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(**ask, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "not supported by this server: tools" in refused.value.response.text


def test_judge_in_logprobs_mode_orders_exact_paraphrase_unrelated(tmp_path, smollm2_server):
    result = run_cli("eval=rewards", "reward=llm_judge", "logger=none", f"hydra.run.dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_kind = {kind: means["llm_judge"] for kind, means in summary["by_kind"].items()}
    assert by_kind["exact"] > by_kind["paraphrase"] > by_kind["unrelated"], by_kind
    assert summary["failures"]["llm_judge"]["parse_failures"] < 0.1 * summary["n"]
    # The same judge behind our OpenAI-compatible server, read through top_logprobs, scores the same.
    rows = [json.loads(line) for line in files("core").joinpath("data/sample_qa.jsonl").read_text().splitlines()]
    samples = [RewardSample(r["completion"], r["ground_truth"], r["prompt"], r["extra_info"]) for r in rows]
    served = LLMJudgeReward(GenerationClient(smollm2_server.url), mode="logprobs", prompt_template="yes_no")(samples)
    embedded = [json.loads(line)["llm_judge"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert served == pytest.approx(embedded, abs=1e-3)


def test_every_end_id_stops_generation(smollm2_cfg):
    engine = GenerationEngine(smollm2_cfg)
    # A tokenizer whose eos is not the end-of-turn token (as Llama 3.1's base tokenizer with its
    # instruct weights): the generation config's <|im_end|> must still end the reply.
    engine.tokenizer.eos_token = "<|endoftext|>"
    engine.end_ids = end_token_ids(engine.tokenizer, engine.model.generation_config)
    assert engine.end_ids == [0, 2]
    params = SamplingParams(temperature=0.0, max_tokens=64, logprobs=True)
    reply = engine.chat([[{"role": "user", "content": QUESTION}]], params)[0][0]
    assert reply.finish_reason == "stop" and reply.completion_tokens < 64
    assert reply.logprobs[-1].token == "<|im_end|>" and len(reply.logprobs) == reply.completion_tokens
    assert reply.mean_logprob == pytest.approx(sum(t.logprob for t in reply.logprobs) / reply.completion_tokens)


def test_policy_server_uses_the_chat_template_and_reports_the_end_token(tmp_path):
    with LocalServer(tmp_path, "service=policy", "policy.queue.num_samples=2") as server:
        client = PolicyClient(server.url)
        direct = client.direct_forward(QUESTION, decoding_strategy="beam_search", num_samples=2, max_output_length=120)
        queued = client.forward(QUESTION, decoding_strategy="beam_search")
    assert queued["result"] == direct["result"]  # one prompt format for both routes
    assert "Paris" in direct["result"][0]
    assert direct["stop_strings"][0] == "<|im_end|>" and queued["stop_string_found"][0] == "<|im_end|>"
    assert queued["is_final_step"][0] is True


def test_ppo_step_moves_log_probabilities_toward_positive_advantages(smollm2_cfg, tmp_path):
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    engine = PolicyModel(smollm2_cfg, lora, training={"micro_batch_size": 2, "kl_coef": 0.0})
    good = parse_sample({"question": QUESTION, "current_node": "The capital of France is Paris.", "value": 1.0}, 0)
    bad = parse_sample({"question": QUESTION, "current_node": "The capital of France is Rome.", "value": -1.0}, 1)

    def logprob(sample) -> float:
        with torch.no_grad():
            logp, response = engine._logprobs([engine.encode(sample)])
        return float((logp * response).sum())

    before = logprob(good), logprob(bad)
    report = engine.train([good, bad], num_epochs=3, lr=1e-3, should_stop=lambda: False, out_dir=Path(tmp_path))
    after = logprob(good), logprob(bad)
    assert report["steps"] == 3
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    assert math.isfinite(after[0])


def test_infogain_is_higher_for_a_helpful_context_than_an_unrelated_one():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["ig.num_generations=5", "ig.max_new_tokens=24", "seed=0"])
    engine = instantiate(cfg.ig)
    assert engine.health()["random_weights"] == []  # SmolLM2 generator, MiniLM entailment
    rows = [json.loads(line) for line in (ROOT / "infogain/data/helpful_vs_unrelated.jsonl").read_text().splitlines()]
    items = [
        {"question": r["question"], "context": r[kind], "answers": r["answers"]}
        for r in rows[:6]
        for kind in ("helpful", "unrelated")
    ]
    scores = [r["score"] for r in engine.compute(items)]
    helpful, unrelated = sum(scores[0::2]) / 6, sum(scores[1::2]) / 6
    # SmolLM2-135M's signal is small (per item it often goes the other way): the means are
    # compared, seeded (seeds 0, 1, 2 gave +0.010, +0.004, +0.006 apart with the decode loop)
    assert helpful > unrelated, (helpful, unrelated)
