"""Structured outputs (OpenAI's ``response_format``) enforced while decoding, on the real SmolLM2:
through the official client, LangChain's ``with_structured_output``, our client, and the judge's
JSON mode, served and in process."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from conftest import JUDGE_KEY
from core.models.generation_client import GenerationClient
from core.models.generation_engine import GenerationEngine
from core.models.loading import SMOLLM2_ID
from core.rewards.base import RewardSample
from judges.llm_judge import LLMJudgeReward
from judges.prompts import JSON_REPLY

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe the capital of France as JSON."}]


@pytest.mark.slow
def test_sampled_replies_always_satisfy_the_schema(smollm2_server):
    oai = openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="none", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    reply = oai.chat.completions.create(
        model=SMOLLM2_ID, messages=ASK, n=12, temperature=1.0, max_tokens=128, response_format=fmt, seed=3
    )
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), CITY)
    texts = {c.message.content for c in reply.choices}
    assert len(texts) > 1  # sampled, not one forced string
    # json_object on the completions route too; a schema the compiler refuses is a 400
    body = oai.completions.create(  # (vLLM takes it there too; the openai client passes it as an extra field)
        model=SMOLLM2_ID,
        prompt="A JSON object about Paris:",
        max_tokens=48,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(body.choices[0].text), dict)
    bad = httpx.post(
        f"{smollm2_server.url}/v1/chat/completions",
        json={
            "messages": ASK,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}},
        },
    )
    assert bad.status_code == 400 and "response_format cannot be enforced" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_langchain_structured_output_works_against_our_server(smollm2_server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{smollm2_server.url}/v1", api_key="none", model=SMOLLM2_ID, temperature=0, max_tokens=96
    )
    result = chat.with_structured_output(CITY | {"title": "City", "description": "A city"}).invoke(ASK[0]["content"])
    jsonschema.validate(result, CITY)


@pytest.mark.slow
def test_judge_json_mode_scores_the_same_served_and_in_process(smollm2_server, smollm2_cfg):
    samples = [
        RewardSample("Paris", "Paris", "What is the capital of France?"),
        RewardSample("Bananas are yellow.", "Paris", "What is the capital of France?"),
        RewardSample("4", "4", "What is two plus two?"),
    ]
    options = dict(mode="json", prompt_template="json", temperature=0.0, max_new_tokens=128)
    local = LLMJudgeReward(GenerationEngine(smollm2_cfg), **options)
    served = LLMJudgeReward(GenerationClient(smollm2_server.url), **options)
    assert served(samples) == pytest.approx(local(samples), abs=1e-6)
    assert local.stats["parse_failures"] == served.stats["parse_failures"] == 0
    assert JSON_REPLY["required"] == ["score", "reason"]


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_400(judge_server):
    refused = httpx.post(
        f"{judge_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {JUDGE_KEY}"},
        json={"messages": ASK, "response_format": {"type": "json_object"}},
    )
    assert refused.status_code == 400
    assert "structured outputs need a tokenizer llguidance can read" in refused.json()["error"]["message"]
