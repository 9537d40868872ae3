"""LLM judge: our OpenAI-compatible server with a tiny model, and the judge reward."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import JUDGE_KEY, ThreadServer, free_port, scripted_openai_app
from core.models.generation import SamplingParams
from core.models.generation_client import GenerationClient
from core.models.generation_engine import GenerationEngine
from core.rewards.base import RewardSample, verl_batched, verl_compute_score
from core.serving.errors import error_message
from judges.llm_judge import LLMJudgeReward
from judges.prompts import parse_reward, strip_thinking

AUTH = {"Authorization": f"Bearer {JUDGE_KEY}"}


@pytest.fixture(scope="module")
def oai(judge_server):
    return openai.OpenAI(base_url=f"{judge_server.url}/v1", api_key=JUDGE_KEY, max_retries=0)


def test_models_list_and_chat_with_official_client(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen2"]
    chat = oai.chat.completions.create(
        model="tiny-qwen2", n=3, max_tokens=8, temperature=1.0, messages=[{"role": "user", "content": "Grade this."}]
    )
    assert len(chat.choices) == 3 and [c.index for c in chat.choices] == [0, 1, 2]
    assert all(isinstance(c.message.content, str) and c.finish_reason in ("stop", "length") for c in chat.choices)
    assert chat.usage.completion_tokens <= 3 * 8 and chat.usage.prompt_tokens > 0


def test_completions_with_prompt_list(oai):
    result = oai.completions.create(model="tiny-qwen2", prompt=["one", "two"], n=2, max_tokens=4, temperature=1.0)
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]


def test_greedy_is_deterministic_and_stop_strings_cut(oai):
    ask = dict(
        model="tiny-qwen2",
        max_tokens=24,
        temperature=0.0,
        messages=[{"role": "user", "content": "Say something long."}],
    )
    full = oai.chat.completions.create(**ask).choices[0].message.content
    again = oai.chat.completions.create(**ask).choices[0].message.content
    assert full == again and len(full.split()) > 4
    stop = full.split()[3]
    cut = oai.chat.completions.create(**ask, stop=[stop, "never-appears"]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop


def test_thinking_switch_reaches_the_chat_template(oai):
    ask = dict(model="tiny-qwen2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    plain = oai.chat.completions.create(**ask)
    no_think = oai.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert no_think.usage.prompt_tokens > plain.usage.prompt_tokens  # the closed empty <think> block


def test_concurrent_requests_are_micro_batched(judge_server, oai):
    before = judge_server.metric("generation_model_calls_total", AUTH)

    def one(i):
        return oai.chat.completions.create(
            model="tiny-qwen2",
            max_tokens=8,
            temperature=0.7,
            top_p=0.8,
            messages=[{"role": "user", "content": f"question {i}"}],
        )

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(16)))
    calls = judge_server.metric("generation_model_calls_total", AUTH) - before
    assert all(len(r.choices) == 1 for r in replies)
    assert 1 <= calls < 16 / 2  # prefills: requests joined the batch in groups


def test_a_short_request_is_answered_while_a_long_one_still_decodes(oai):
    # iteration-level batching: the short request joins the running batch at the next step and
    # leaves it after its 4 tokens; a whole-batch server would answer it after the long one
    done = {}

    def ask(name, tokens, delay):
        time.sleep(delay)
        reply = oai.completions.create(model="tiny-qwen2", prompt=f"{name} story", max_tokens=tokens, temperature=0.0)
        done[name] = (time.perf_counter(), reply.usage.completion_tokens)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(ask, ["long", "short"], [600, 4], [0.0, 0.3]))
    assert done["long"][1] == 600 and done["short"][1] == 4
    assert done["short"][0] < done["long"][0]


def test_the_official_client_shows_our_error_messages(oai):
    with pytest.raises(openai.BadRequestError, match="not supported by this server: logit_bias"):
        oai.chat.completions.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": "x"}], logit_bias={"5": 10}
        )
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_api_key_is_enforced(judge_server):
    bad = openai.OpenAI(base_url=f"{judge_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{judge_server.url}/health").json()["model"] == "tiny-qwen2"


@pytest.mark.parametrize(
    ("path", "send", "status", "phrase"),
    [
        (
            "/v1/chat/completions",
            dict(content=b"{oops", headers={"content-type": "application/json"}),
            400,
            "invalid JSON",
        ),
        ("/v1/chat/completions", dict(json={"messages": []}), 422, "messages"),
        (
            "/v1/chat/completions",
            dict(json={"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            422,
            "temperature",
        ),
        ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "x"}], "n": 0}), 422, "n"),
        (
            "/v1/chat/completions",
            dict(json={"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
            422,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            dict(json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            400,
            "top_logprobs needs logprobs=true",
        ),
        ("/v1/completions", dict(json={"prompt": "x", "logprobs": 21}), 422, "logprobs"),
        ("/v1/completions", dict(json={"prompt": "", "max_tokens": 4}), 400, "prompt 0 is empty"),
        ("/v1/completions", dict(json={"prompt": ["ok", ""], "max_tokens": 4}), 400, "prompt 1 is empty"),
        (
            "/v1/chat/completions",
            dict(json={"messages": [{"role": "user", "content": "x"}], "seed": 2**70}),
            422,
            "seed",
        ),
        (
            "/v1/completions",
            dict(json={"prompt": "word " * 2100, "max_tokens": 16}),
            400,
            "maximum context length is 2048 tokens",
        ),
        (
            "/v1/chat/completions",
            dict(json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "does not exist",
        ),
        ("/v1/completions", dict(json={"prompt": ["p"] * 257, "max_tokens": 1}), 413, "maximum allowed batch size"),
        ("/v1/completions", dict(json={"prompt": [], "max_tokens": 1}), 422, "cannot be empty"),
        (
            "/judge",
            dict(json={"items": [{"reference": "a", "candidate": "b"}], "prompt_template": "nonexistent"}),
            400,
            "unknown prompt template",
        ),
        ("/judge", dict(json={"items": []}), 422, "cannot be empty"),
        # Huge and negative counts, and numbers sent as strings: refused before any model work.
        ("/v1/completions", dict(json={"prompt": "x", "n": 10**6}), 422, "n"),
        ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 10**9}), 400, "must be below the model's context"),
        ("/v1/completions", dict(json={"prompt": "x", "max_tokens": -5}), 422, "max_tokens"),
        ("/v1/completions", dict(json={"prompt": "x", "n": 64, "max_tokens": 1500}), 400, "max_batch_tokens"),
        ("/v1/completions", dict(json={"prompt": "x", "max_tokens": "5"}), 422, "max_tokens"),
        ("/v1/completions", dict(json={"prompt": "x", "stream": 0}), 422, "stream"),
        (
            "/judge",
            dict(json={"items": [{"reference": "a", "candidate": "b"}], "max_new_tokens": 10**9}),
            400,
            "context",
        ),
        ("/judge", dict(json={"items": [{"candidate": "b"}]}), 422, "reference"),
    ],
)
def test_bad_input_gets_json_error(judge_server, path, send, status, phrase):
    response = httpx.post(f"{judge_server.url}{path}", headers={**AUTH, **send.pop("headers", {})}, **send)
    assert response.status_code == status, response.text
    body = response.json()
    assert phrase in error_message(body)
    # OpenAI routes answer in OpenAI's error shape, our /judge route in the kit's
    assert isinstance(body["error"], dict) == path.startswith("/v1/"), body
    assert httpx.get(f"{judge_server.url}/health").status_code == 200


def test_judge_route_scores_in_unit_interval(judge_server):
    body = {"items": [{"problem": "2+2?", "reference": "4", "candidate": "four"}] * 3, "max_new_tokens": 8}
    result = httpx.post(f"{judge_server.url}/judge", json=body, headers=AUTH).json()
    assert len(result["scores"]) == 3 and all(0.0 <= s <= 1.0 for s in result["scores"])
    assert len(result["replies"]) == 3 and result["model"] == "tiny-qwen2"


# --- the judge reward, against a scripted stand-in for vLLM (an external server) -------------------


@pytest.fixture
def scripted():
    seen: list[dict] = []
    replies = {
        "Candidate solution:\nParis": "The candidate matches. REWARD: 0.9",
        "Candidate solution:\nLyon": "<think>maybe REWARD: 0.8</think>It is wrong. REWARD: 0.1",
        "Candidate solution:\nHuge": "REWARD: 7",
        "Candidate solution:\nVague": "I cannot decide.",
    }
    with ThreadServer(scripted_openai_app(replies, "REWARD: 0.5", seen)) as server:
        yield server, seen


def test_judge_reward_parses_clamps_and_strips_thinking(scripted):
    server, seen = scripted
    judge = LLMJudgeReward(GenerationClient(server.url))
    samples = [RewardSample(c, "Paris", "Capital of France?") for c in ("Paris", "Lyon", "Huge", "Vague")]
    assert judge(samples) == [0.9, 0.1, 1.0, 0.0]
    assert judge.stats["parse_failures"] == 1 and judge.stats["requests_failed"] == 0
    body = seen[0]
    assert body["model"] == "Qwen/Qwen3-32B"  # discovered from /v1/models
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.8, 512)  # seed defaults
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "Problem:\nCapital of France?" in body["messages"][0]["content"]


def test_judge_reward_best_reference_filters_and_overrides(scripted):
    server, seen = scripted
    judge = LLMJudgeReward(GenerationClient(server.url), batch_size=2)
    template = "Q={PROBLEM} R={REFERENCE_SOLUTION} C={CANDIDATE_SOLUTION} -> REWARD: <score>"
    scores = judge(
        [
            RewardSample("Paris", ["Lyon", "Paris"], extra_info={"problem": "p"}),
            RewardSample(
                "Paris",
                ["Lyon", "Paris"],
                extra_info={
                    "problem": "p",
                    "target_gt": "Lyon",
                    "prompt_template": template,
                    "temperature": 0.2,
                    "enable_thinking": True,
                },
            ),
        ]
    )
    assert scores == [0.9, 0.5]  # the custom template has no "Candidate solution:" line: default reply
    custom = [b for b in seen if b["messages"][0]["content"].startswith("Q=p R=Lyon C=Paris")]
    assert len(custom) == 1 and custom[0]["temperature"] == 0.2
    assert custom[0]["chat_template_kwargs"] == {"enable_thinking": True}
    assert len(seen) == 3  # two references for the first sample, one (filtered) for the second
    judge([RewardSample("Paris", "Paris", extra_info={"model_name": "judge-b"})])
    assert seen[-1]["model"] == "judge-b"  # model_name alone picks the model on the configured server


def test_judge_reward_verl_forms_agree(scripted):
    server, _ = scripted
    judge = LLMJudgeReward(GenerationClient(server.url))
    single = verl_compute_score(judge)("math", "Lyon", "Paris", {"problem": "Capital?"})
    batched = verl_batched(judge)(["math"] * 2, ["Lyon", "Paris"], ["Paris", "Paris"], [{"problem": "Capital?"}] * 2)
    assert single == 0.1 and batched == [0.1, 0.9]


def test_judge_server_down_scores_zero_and_counts():
    judge = LLMJudgeReward(
        GenerationClient(f"http://127.0.0.1:{free_port()}", timeout=1, max_retries=1, model_name="m")
    )
    judge.generator.http.backoff_s = 0.05
    started = time.monotonic()
    assert judge([RewardSample("a", "b"), RewardSample("c", "d")]) == [0.0, 0.0]
    assert time.monotonic() - started < 2
    assert judge.stats["requests_failed"] == 1


def test_unknown_template_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="default, detailed"):
        LLMJudgeReward(generator=None, prompt_template="fancy")


def test_parse_and_strip_helpers():
    assert parse_reward("reward: .25") == 0.25
    assert parse_reward("REWARD: -3") == 0.0
    assert parse_reward("no score") is None
    assert strip_thinking("reasoning...</think>REWARD: 1") == "REWARD: 1"


def test_in_process_engine_and_client_share_one_interface(judge_server, tiny_model_cfg):
    engine = GenerationEngine(tiny_model_cfg)
    client = GenerationClient(judge_server.url, api_key=JUDGE_KEY)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6)
    conversation = [[{"role": "user", "content": "Compare these answers."}]]
    local, remote = engine.chat(conversation, params), client.chat(conversation, params)
    assert [c.text for c in local[0]] == [c.text for c in remote[0]]  # same weights (seed 0), greedy
    judge = LLMJudgeReward(engine, max_new_tokens=6)
    scores = judge([RewardSample("x", "y"), RewardSample("z", "w")])
    assert all(0.0 <= s <= 1.0 for s in scores) and judge.stats["judge_calls"] == 2


def test_verl_entry_point_reads_the_seed_env(scripted, monkeypatch):
    from judges import verl_rewards

    server, seen = scripted
    monkeypatch.setenv("LLM_JUDGE_SERVER_URL", server.url)
    monkeypatch.setenv("LLM_JUDGE_SERVER_TIMEOUT", "5")
    verl_rewards._judge.cache_clear()
    try:
        assert verl_rewards.llm_judge_compute_score("ds", "Paris", "Paris", {"problem": "Capital?"}) == 0.9
        assert verl_rewards.llm_judge_compute_score(
            data_sources=["ds"] * 2, solution_strs=["Lyon", "Paris"], ground_truths=["Paris"] * 2, extra_infos=None
        ) == [0.1, 0.9]
    finally:
        verl_rewards._judge.cache_clear()


def test_verl_dispatcher_routes_by_data_source_prefix(scripted, embedding_server, monkeypatch):
    from judges import verl_rewards

    server, _seen = scripted
    monkeypatch.setenv("LLM_JUDGE_SERVER_URL", server.url)
    monkeypatch.setenv("EMBEDDING_SERVER_URL", embedding_server.url)
    verl_rewards._judge.cache_clear()
    verl_rewards._embedding.cache_clear()
    try:
        judged = verl_rewards.compute_score("llm_judge_remote_qa", "Paris", "Paris", {"problem": "Capital?"})
        embedded = verl_rewards.compute_score("embedding_remote_qa", "A cat naps.", "A cat sleeps.", None)
        assert judged == 0.9 and 0.8 < embedded < 1.0
        batch = verl_rewards.compute_score(
            data_sources=["embedding_remote_qa", "llm_judge_remote_qa", "llm_judge_remote_qa"],
            solution_strs=["A cat naps.", "Lyon", "Paris"],
            ground_truths=["A cat sleeps.", "Paris", "Paris"],
            extra_infos=[None, {"problem": "Capital?"}, {"problem": "Capital?"}],
        )
        assert batch == [pytest.approx(embedded), 0.1, 0.9]
        try:
            import verl  # noqa: F401
        except ImportError:
            with pytest.raises(NotImplementedError, match="matches none of llm_judge\\*, embedding\\*"):
                verl_rewards.compute_score("openai/gsm8k", "42", "42")
    finally:
        verl_rewards._judge.cache_clear()
        verl_rewards._embedding.cache_clear()


def test_an_abandoned_request_stops_generating(judge_server):
    # A client that times out: the server stops its generation at the next token, so a short
    # request after it is answered at once instead of after the abandoned one's thousands of tokens.
    headers = {"Authorization": f"Bearer {JUDGE_KEY}"}
    long = {"prompt": "Once upon a time", "max_tokens": 1900, "n": 32, "temperature": 1.0, "seed": 1}
    gone_before = judge_server.metric('generation_requests_total{route="/v1/completions",status="499"}', headers)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{judge_server.url}/v1/completions", json=long, headers=headers, timeout=1.0)
    started = time.monotonic()
    short = httpx.post(
        f"{judge_server.url}/v1/completions",
        json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
        headers=headers,
        timeout=120,
    )
    waited = time.monotonic() - started
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 2
    assert waited < 4.0, waited
    assert (
        judge_server.metric('generation_requests_total{route="/v1/completions",status="499"}', headers)
        == gone_before + 1
    )


def test_token_id_prompts_are_taken_as_given(judge_server, oai, tiny_model_cfg):
    from core.models.loading import load_tokenizer

    text = "The capital of France is"
    prompt_ids = load_tokenizer(tiny_model_cfg)(text, add_special_tokens=False)["input_ids"]
    greedy = {"model": "tiny-qwen2", "max_tokens": 6, "temperature": 0}
    from_text = oai.completions.create(prompt=text, **greedy).choices[0].text
    one = oai.completions.create(prompt=prompt_ids, **greedy)
    many = oai.completions.create(prompt=[prompt_ids, prompt_ids], **greedy)
    assert one.choices[0].text == from_text and [c.text for c in many.choices] == [from_text] * 2
    assert one.usage.prompt_tokens == len(prompt_ids)
    outside = httpx.post(f"{judge_server.url}/v1/completions", headers=AUTH, json={"prompt": [10**8], "max_tokens": 1})
    assert outside.status_code == 400 and "outside the model's vocabulary" in error_message(outside.json())
