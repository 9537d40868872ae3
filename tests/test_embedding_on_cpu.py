"""Embedding reward and the TEI-compatible server, with the real MiniLM on loopback."""

from __future__ import annotations

import math
import time

import httpx
import numpy as np
import pytest

from conftest import ThreadServer, free_port
from core.models.embedding_client import EmbeddingClient
from core.rewards.base import RewardSample, trl_reward_func, verl_batched, verl_compute_score
from judges.embedding_reward import EmbeddingSimilarityReward, length_factor, lexical_similarity

EMBED_OK = 'embedding_requests_total{route="/embed",status="200"}'
PAIRS = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", "Stock markets fell sharply on Monday."),
    ("How do I reset my password?", "What are the steps to change my password?", "The recipe needs two eggs."),
    ("The weather is sunny and warm today.", "It is a bright, hot day.", "He plays the violin in an orchestra."),
]


@pytest.fixture(scope="module")
def client(embedding_server):
    return EmbeddingClient(embedding_server.url, timeout=30)


def test_tei_embed_shapes(embedding_server):
    single = httpx.post(f"{embedding_server.url}/embed", json={"inputs": "hello world"}).json()
    assert len(single) == 1 and len(single[0]) == 384  # TEI answers a list of vectors, even for one input
    assert math.isclose(float(np.linalg.norm(single[0])), 1.0, rel_tol=1e-4)
    # normalize=false gives the pooled vectors as they are (MiniLM's own Normalize layer is not applied):
    whole = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["a"], "normalize": False}).json()
    assert not math.isclose(float(np.linalg.norm(whole[0])), 1.0, rel_tol=1e-2)
    raw = httpx.post(
        f"{embedding_server.url}/embed", json={"inputs": ["a", "b", "c"], "normalize": False, "dimensions": 8}
    ).json()
    unit = httpx.post(
        f"{embedding_server.url}/embed", json={"inputs": ["a", "b", "c"], "normalize": True, "dimensions": 8}
    ).json()
    assert len(raw) == 3 and len(raw[0]) == 8
    assert math.isclose(float(np.linalg.norm(unit[0])), 1.0, rel_tol=1e-4)
    assert np.allclose(np.asarray(raw[0]) / np.linalg.norm(raw[0]), unit[0], atol=1e-5)


def test_tei_info_and_health(embedding_server):
    info = httpx.get(f"{embedding_server.url}/info").json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 32
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert httpx.get(f"{embedding_server.url}/health").json()["status"] == "ok"


def test_truncation_rules(embedding_server):
    long_text = "word " * 600
    refused = httpx.post(f"{embedding_server.url}/embed", json={"inputs": [long_text]})
    assert refused.status_code == 413 and "truncate=true" in refused.json()["error"]
    right = httpx.post(f"{embedding_server.url}/embed", json={"inputs": long_text, "truncate": True}).json()
    left = httpx.post(
        f"{embedding_server.url}/embed",
        json={
            "inputs": "tail end " + long_text + " the final words here",
            "truncate": True,
            "truncation_direction": "Left",
        },
    ).json()
    assert len(right[0]) == 384 and len(left[0]) == 384
    assert not np.allclose(right[0], left[0])


def test_openai_embeddings_with_official_client(embedding_server):
    import openai

    oc = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="unused")
    result = oc.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=["one", "two"])
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) == 384
    tei = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["one"]}).json()[0]
    assert np.allclose(result.data[0].embedding, tei, atol=1e-5)
    assert result.usage.prompt_tokens > 0


def test_served_embeddings_equal_in_process(client):
    from sentence_transformers import SentenceTransformer

    from core.models.loading import MINILM_ID, resolve_path

    texts = [t for triple in PAIRS for t in triple]
    local = SentenceTransformer(resolve_path(MINILM_ID), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(client.embed(texts), local, atol=1e-5)


def test_paraphrases_score_higher_than_unrelated_through_served_reward(client):
    reward = EmbeddingSimilarityReward(client)
    samples = [RewardSample(c, ref) for ref, para, unrel in PAIRS for c in (para, unrel)]
    scores = reward(samples)
    for k in range(len(PAIRS)):
        assert scores[2 * k] > scores[2 * k + 1] + 0.1
    assert reward.stats["requests_failed"] == 0


def test_verl_trl_and_batched_forms_agree(client):
    reward = EmbeddingSimilarityReward(client, cache_enabled=False)
    sols = [p for _, p, _ in PAIRS]
    refs = [r for r, _, _ in PAIRS]
    batched = verl_batched(reward)(["d"] * 3, sols, refs, [{}] * 3)
    single = [verl_compute_score(reward)("d", s, r, {}) for s, r in zip(sols, refs, strict=True)]
    keyword = verl_compute_score(reward)(data_sources=["d"] * 3, solution_strs=sols, ground_truths=refs)
    trl = trl_reward_func(reward)(
        prompts=["q"] * 3, completions=[[{"role": "assistant", "content": s}] for s in sols], ground_truth=refs
    )
    assert np.allclose(batched, single, atol=1e-6)
    assert np.allclose(batched, keyword, atol=1e-6)
    assert np.allclose(batched, trl, atol=1e-6)
    assert trl_reward_func(reward).__name__ == "embedding"


def test_cache_hits_skip_the_server(embedding_server, client):
    reward = EmbeddingSimilarityReward(client, cache_enabled=True)
    samples = [RewardSample("a brand new sentence for the cache", "another reference sentence")]
    before = embedding_server.metric("embedding_model_items_total")
    first = reward(samples)
    middle = embedding_server.metric("embedding_model_items_total")
    second = reward(samples)
    after = embedding_server.metric("embedding_model_items_total")
    assert middle - before == 2 and after == middle  # the second call never reached the model
    assert first == second and reward.cache_counts() == (2, 2)
    uncached = reward(
        [RewardSample(samples[0].completion, samples[0].ground_truth, extra_info={"cache_enabled": False})]
    )
    assert embedding_server.metric("embedding_model_items_total") == after + 2 and uncached == first


def test_batched_form_sends_one_request_per_chunk(embedding_server):
    client = EmbeddingClient(embedding_server.url, batch_size=4)
    reward = EmbeddingSimilarityReward(client, cache_enabled=False)
    before = embedding_server.metric(EMBED_OK)
    reward([RewardSample(f"answer number {i}", f"reference number {i}") for i in range(5)])  # 10 texts
    assert embedding_server.metric(EMBED_OK) - before == 3  # ceil(10 / 4)


@pytest.mark.parametrize(
    ("kind", "ref_words", "out_words", "expected"),
    [
        ("none", 10, 2, 1.0),
        ("ratio", 10, 12, 1.0),  # 1.2 is inside [1/1.5, 1.5]
        ("ratio", 10, 2, 0.2),
        ("ratio", 2, 10, 0.2),  # too long is penalised like too short
        ("sqrt", 10, 4, math.sqrt(0.4)),
        ("quadratic", 10, 4, 0.16),
        ("exponential", 10, 4, math.exp(-0.6)),
        ("log", 10, 4, math.log(5) / math.log(11)),
        ("ratio", 10, 0, 0.0),
    ],
)
def test_length_penalties_match_hand_computed_values(kind, ref_words, out_words, expected):
    assert math.isclose(length_factor("w " * ref_words, "w " * out_words, kind, 1.5), expected, rel_tol=1e-9)


def test_unknown_penalty_is_refused():
    with pytest.raises(ValueError, match="unknown length_penalty"):
        length_factor("a", "b", "cubic")


def test_penalty_and_reference_filter_apply_through_the_reward(client):
    reward = EmbeddingSimilarityReward(client, cache_enabled=False)
    ref = "one two three four five six seven eight nine ten"
    plain = reward([RewardSample("one two", ref)])[0]
    penalised = reward([RewardSample("one two", ref, extra_info={"length_penalty": "ratio"})])[0]
    assert math.isclose(penalised, plain * 0.2, rel_tol=1e-6)
    refs = ["A cat naps on the couch.", "Stock markets fell sharply."]
    cat = "The cat is sleeping on the sofa."
    best = reward([RewardSample(cat, refs)])[0]
    forced = reward([RewardSample(cat, refs, extra_info={"target_gt": refs[1]})])[0]
    by_token = reward(
        [RewardSample(cat, refs, extra_info={"filter_gt_by_prompt_token": True, "prompt": "Summarise: markets"})]
    )[0]
    assert best > forced and math.isclose(forced, by_token, rel_tol=1e-6)


def test_server_down_falls_back_to_lexical_within_timeout():
    dead = EmbeddingClient(f"http://127.0.0.1:{free_port()}", timeout=2, max_retries=2)
    dead.http.backoff_s = 0.05
    reward = EmbeddingSimilarityReward(dead)
    started = time.monotonic()
    scores = reward([RewardSample("hello world", "hello there world"), RewardSample("abc", ["xyz", "abd"])])
    assert time.monotonic() - started < 2
    assert scores == [lexical_similarity("hello world", "hello there world"), lexical_similarity("abc", "abd")]
    assert reward.stats["requests_failed"] == 1 and reward.stats["fallback_samples"] == 2


def test_a_failing_server_costs_one_request_not_one_per_sample():
    # verl's reward loop calls the single form once per sample: with the server failing, only the
    # first call pays the retries; the circuit breaker answers the others at once (lexical fallback).
    from core.serving.app import ServerSettings, create_app
    from core.serving.errors import APIError

    seen = []
    app = create_app("failing-embedder", ServerSettings())

    @app.post("/embed")
    async def _embed():
        seen.append(1)
        raise APIError(503, "overloaded")

    with ThreadServer(app) as server:
        client = EmbeddingClient(server.url, timeout=2, max_retries=3)
        client.http.backoff_s = 0.01
        score = verl_compute_score(EmbeddingSimilarityReward(client, cache_enabled=False))
        scores = [score("embedding_remote_qa", f"answer {i}", "answer") for i in range(8)]
    assert len(seen) == 4  # 1 + 3 retries, once
    assert scores == [lexical_similarity(f"answer {i}", "answer") for i in range(8)]


def test_server_url_in_extra_info_overrides_the_default(embedding_server):
    dead = EmbeddingClient(f"http://127.0.0.1:{free_port()}", timeout=1, max_retries=0)
    reward = EmbeddingSimilarityReward(dead)
    score = reward([RewardSample("A cat naps.", "A cat sleeps.", extra_info={"server_url": embedding_server.url})])
    assert reward.stats["requests_failed"] == 0 and score[0] > 0.8


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        ({"inputs": []}, 422, "cannot be empty"),
        ({"inputs": [f"t{i}" for i in range(33)]}, 413, "batch size 33 > maximum allowed batch size 32"),
        ({"inputs": 5}, 422, "inputs"),
        ({"inputs": ["ok"], "normalize": "yes"}, 422, "normalize"),
        ({"inputs": ["ok"], "dimensions": 1000}, 422, "dimensions"),
        ({"text": "no inputs"}, 422, "inputs"),
    ],
)
def test_bad_embed_requests(embedding_server, body, status, phrase):
    response = httpx.post(f"{embedding_server.url}/embed", json=body)
    assert response.status_code == status and phrase in response.json()["error"]
    assert httpx.get(f"{embedding_server.url}/health").status_code == 200


def test_concurrent_requests_share_model_calls(embedding_server):
    from concurrent.futures import ThreadPoolExecutor

    calls_before = embedding_server.metric("embedding_model_calls_total")
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda i: httpx.post(f"{embedding_server.url}/embed", json={"inputs": [f"concurrent text {i}"]}).json(),
                range(16),
            )
        )
    calls = embedding_server.metric("embedding_model_calls_total") - calls_before
    assert all(len(r) == 1 and len(r[0]) == 384 for r in results)
    assert calls < 16


def test_verl_entry_point_reads_the_seed_env(embedding_server, monkeypatch):
    from judges import verl_rewards

    monkeypatch.setenv("EMBEDDING_SERVER_URL", embedding_server.url)
    verl_rewards._embedding.cache_clear()
    try:
        refs = ["A cat sleeps.", "Dogs bark loudly."]
        single = verl_rewards.embedding_compute_score("ds", "A cat naps.", refs, None)
        batched = verl_rewards.embedding_compute_score(
            data_sources=["ds"], solution_strs=["A cat naps."], ground_truths=[refs], extra_infos=[None]
        )
        assert single > 0.8 and batched == [pytest.approx(single)]
    finally:
        verl_rewards._embedding.cache_clear()


def test_prompt_names_are_the_models_own(embedding_server):
    plain = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["a question"]}).json()
    query = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["a question"], "prompt_name": "query"})
    assert query.status_code == 200 and np.allclose(query.json(), plain, atol=1e-6)  # MiniLM's "query" is empty
    unknown = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["a question"], "prompt_name": "nope"})
    assert unknown.status_code == 422 and "['document', 'query']" in unknown.json()["error"]
    client = EmbeddingClient(embedding_server.url)
    assert np.allclose(client.embed(["a question"], prompt_name="query"), plain, atol=1e-6)


def test_tei_and_openai_clients_work_unchanged(embedding_server):
    import openai
    from huggingface_hub import InferenceClient

    vector = np.asarray(InferenceClient(base_url=embedding_server.url).feature_extraction("A cat naps."))
    served = httpx.post(f"{embedding_server.url}/embed", json={"inputs": "A cat naps."}).json()
    assert np.allclose(vector.reshape(-1), served[0], atol=1e-5)
    oai = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in oai.models.list().data] == ["sentence-transformers/all-MiniLM-L6-v2"]
    other_name = oai.embeddings.create(model="all-MiniLM-L6-v2", input=["A cat naps."]).data[0].embedding
    assert np.allclose(other_name, served[0], atol=1e-5)
    # Token-id inputs (OpenAI's and TEI's): the ids of the text embed as the text does.
    from transformers import AutoTokenizer

    from core.models.loading import MINILM_ID, resolve_path

    ids = AutoTokenizer.from_pretrained(resolve_path(MINILM_ID))("A cat naps.", add_special_tokens=False)
    by_ids = oai.embeddings.create(model="any", input=[ids["input_ids"]]).data[0].embedding
    assert np.allclose(by_ids, served[0], atol=1e-5)
    tei_ids = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ids["input_ids"]}).json()
    assert np.allclose(tei_ids[0], served[0], atol=1e-5)
    outside = httpx.post(f"{embedding_server.url}/embed", json={"inputs": [10**8]})
    assert outside.status_code == 400 and "outside the model's vocabulary" in outside.json()["error"]


def test_openai_route_takes_openai_batch_sizes_and_langchain_defaults(embedding_server):
    from langchain_openai import OpenAIEmbeddings

    # 100 texts: over TEI's 32 a request (still refused on /embed), within OpenAI's 2,048.
    texts = [f"sentence number {i} about {PAIRS[i % 3][0]}" for i in range(100)]
    tei = httpx.post(f"{embedding_server.url}/embed", json={"inputs": texts})
    assert tei.status_code == 413 and "maximum allowed batch size 32" in tei.json()["error"]
    # LangChain's defaults (chunk_size 1,000 per request); its token counter would need a download.
    lc = OpenAIEmbeddings(
        base_url=f"{embedding_server.url}/v1",
        api_key="none",
        model="text-embedding-3-small",
        check_embedding_ctx_length=False,
    )
    vectors = np.array(lc.embed_documents(texts))
    expected = np.concatenate(
        [
            httpx.post(f"{embedding_server.url}/embed", json={"inputs": texts[i : i + 32]}).json()
            for i in range(0, 100, 32)
        ]
    )
    assert vectors.shape == (100, 384) and np.allclose(vectors, expected, atol=1e-5)
    assert np.allclose(lc.embed_query(texts[7]), expected[7], atol=1e-5)
    over = httpx.post(f"{embedding_server.url}/v1/embeddings", json={"input": ["x"] * 2049})
    assert over.status_code == 413 and "maximum allowed batch size 2048" in over.json()["error"]["message"]


def test_abandoned_requests_free_the_embedding_server(embedding_server):
    # A client firing many large requests and then giving up: what was queued is never computed and
    # the model call in progress stops at its next chunk, so the next client waits for none of it.
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"sentence {i} " + "about the many small things in a long day " * 24 for i in range(32)]

    def abandon(_):
        with pytest.raises(httpx.ReadTimeout):
            # well under one request's model call (32 texts of 250 words), so none can finish in time
            httpx.post(f"{embedding_server.url}/embed", json={"inputs": texts}, timeout=0.25)

    answered, abandoned = (f'embedding_requests_total{{route="/embed",status="{code}"}}' for code in (200, 499))
    answered_before, abandoned_before = embedding_server.metric(answered), embedding_server.metric(abandoned)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(abandon, range(16)))
    started = time.monotonic()
    vectors = httpx.post(f"{embedding_server.url}/embed", json={"inputs": ["a short one"]}, timeout=60).json()
    waited = time.monotonic() - started
    assert len(vectors) == 1 and len(vectors[0]) == 384
    assert waited < 4.0, waited
    # None of the 16 was answered, and each counts as the client's leaving (499), also one that left
    # while its body was read (which FastAPI answers with a 400 no one reads) and the one cut off
    # mid-call, once its chunk ends, which can be after the short request.
    deadline = time.monotonic() + 10
    while embedding_server.metric(abandoned) - abandoned_before < 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert embedding_server.metric(answered) - answered_before == 1
    assert embedding_server.metric(abandoned) - abandoned_before == 16
