"""Prompt log-probabilities on the OpenAI-compatible server, as vLLM answers them (``echo`` with
``logprobs``, ``max_tokens: 0``, ``prompt_logprobs``), through the official client and ours, and
the reference-likelihood reward built on them, in process and served."""

from __future__ import annotations

import json
from importlib.resources import files

import httpx
import openai
import pytest

from conftest import ThreadServer
from core.models.generation import SamplingParams
from core.models.generation_app import generation_app
from core.models.generation_client import GenerationClient
from core.models.generation_engine import GenerationEngine
from core.rewards.base import RewardSample, failure_scope
from core.serving.app import ServerSettings
from judges.likelihood_reward import ReferenceLikelihoodReward

PROMPT = "The capital of France is"
SCORE = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=1)


@pytest.fixture(scope="module")
def engine(tiny_model_cfg) -> GenerationEngine:
    return GenerationEngine(tiny_model_cfg)


@pytest.fixture(scope="module")
def server(engine):
    with ThreadServer(generation_app(engine, ServerSettings())) as running:
        yield running


def test_echo_returns_the_prompt_and_its_log_probabilities_as_vllm_does(engine, server):
    (scored,) = engine.complete([PROMPT], SCORE)[0]
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    # lm-eval's loglikelihood request: the prompt echoed, one token generated, logprobs 1
    reply = oai.completions.create(model=engine.name, prompt=PROMPT, max_tokens=1, logprobs=1, echo=True, temperature=0)
    choice = reply.choices[0]
    n = len(scored.prompt_logprobs)
    assert choice.text.startswith(PROMPT) and len(choice.logprobs.tokens) == n + 1
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:n] == pytest.approx(
        [t.logprob for t in scored.prompt_logprobs[1:]], abs=1e-5
    )
    assert choice.logprobs.tokens[:n] == [t.token for t in scored.prompt_logprobs]
    assert choice.logprobs.text_offset[:2] == [0, len(choice.logprobs.tokens[0])]
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
    # max_tokens 0: the prompt alone, scored
    alone = oai.completions.create(model=engine.name, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    assert alone.choices[0].text == PROMPT and len(alone.choices[0].logprobs.tokens) == n
    assert alone.usage.completion_tokens == 0


def test_prompt_logprobs_in_vllms_shape_on_completions_and_chat(engine, server):
    (scored,) = engine.complete([PROMPT], SCORE)[0]
    body = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 1}
    ).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(scored.prompt_logprobs)
    for entry, token in zip(entries[1:], scored.prompt_logprobs[1:], strict=True):
        own = entry[str(token.token_id)]
        assert own["logprob"] == pytest.approx(token.logprob, abs=1e-5) and own["rank"] == token.rank
        assert min(e["rank"] for e in entry.values()) == 1  # the most likely token is listed too
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0},
    ).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 3
    refused = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "echo": True}
    )
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]


def test_our_client_scores_prompts_as_the_engine_does(engine, server):
    prompts = [PROMPT, "Two plus two makes four, and"]
    client = GenerationClient(server.url)
    served = client.complete(prompts, SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, prompt_logprobs=0))
    local = engine.complete(prompts, SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, prompt_logprobs=0))
    for (s,), (e,) in zip(served, local, strict=True):
        assert s.text == e.text and [t.token for t in s.logprobs] == [t.token for t in e.logprobs]
        assert [t.logprob for t in s.prompt_logprobs] == pytest.approx([t.logprob for t in e.prompt_logprobs], abs=1e-5)


@pytest.mark.slow
def test_likelihood_reward_orders_real_answers_and_is_the_same_served(smollm2_server, smollm2_cfg):
    rows = [json.loads(line) for line in files("core").joinpath("data/sample_qa.jsonl").read_text().splitlines()]
    samples = [RewardSample(r["completion"], r["ground_truth"], r["prompt"]) for r in rows]
    local = ReferenceLikelihoodReward(GenerationEngine(smollm2_cfg))(samples)
    served = ReferenceLikelihoodReward(GenerationClient(smollm2_server.url))(samples)
    assert served == pytest.approx(local, abs=1e-3)
    kinds = {
        k: [s for s, r in zip(local, rows, strict=True) if r["kind"] == k] for k in ("exact", "paraphrase", "unrelated")
    }
    means = {k: sum(v) / len(v) for k, v in kinds.items()}
    assert means["exact"] > means["paraphrase"] > means["unrelated"], means
    assert all(0.0 < s <= 1.0 for s in local)
    down = ReferenceLikelihoodReward(GenerationClient("http://127.0.0.1:9", timeout=1, max_retries=0))
    with failure_scope() as failures:
        assert down(samples[:3]) == [0.0, 0.0, 0.0]
    assert failures.counts == {"requests_failed": 1} and sorted(failures.samples) == [0, 1, 2]
