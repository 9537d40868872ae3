"""InfoGain: the measure against hand-computed values, and the engine end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.models.generation import Completion
from infogain.engine import InfoGainEngine, naive_pair_count
from infogain.entailment import ExactEntailment, NLIEntailment, PairCache
from infogain.measure import cluster, entropies, hard_score, representatives_of, sample_weights, soft_score


def exact_probs(x: str, y: str) -> np.ndarray:
    return ExactEntailment().probs([(x, y)])[0]


def test_soft_score_by_hand():
    weights = sample_weights([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    resp_ans = np.array([[0.9, 0.1], [0.2, 0.6], [0.0, 0.3]])
    ans_resp = np.array([[0.8, 0.4, 0.1], [0.0, 0.7, 0.5]])
    # a0: .5*.9 + .25*max(.2,.4) + .25*max(0,.1) = .575 ; a1: .5*.1 + .25*.7 + .25*.5 = .35
    assert soft_score(weights, resp_ans, ans_resp) == pytest.approx(0.575)


def test_clusters_hard_score_and_entropies_by_hand():
    texts = ["Paris", "paris", "Lyon", "The Paris"]
    weights = sample_weights(np.log([0.4, 0.3, 0.2, 0.1]))
    ids = cluster(texts, exact_probs)
    assert ids == [0, 0, 1, 0]
    assert representatives_of(texts, ids) == ["Paris", "Lyon"]
    assert hard_score(weights, ids, ["Paris", "Lyon"], ["paris"], exact_probs) == pytest.approx(0.8)
    ent = entropies(ids, weights)
    assert ent["discrete"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert ent["weighted"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))


def test_strict_and_loose_clustering_differ_on_neutral_pairs():
    neutral = lambda x, y: np.array([0.2, 0.7, 0.1]) if x != y else np.array([1.0, 0, 0])  # noqa: E731
    assert cluster(["a", "b"], neutral, "strict") == [0, 1]
    assert cluster(["a", "b"], neutral, "loose") == [0, 0]


class ScriptedGenerator:
    """A generator plug-in (the engine's interface) whose samples are fixed per condition."""

    def __init__(self, with_context: list[str], without: list[str], logliks: list[float] | None = None):
        self.with_context, self.without, self.logliks = with_context, without, logliks
        self.calls = 0

    def complete(self, prompts, params, stop=None):
        self.calls += 1
        out = []
        for prompt in prompts:
            texts = self.with_context if "Context:" in prompt else self.without
            logliks = self.logliks or [-1.0] * len(texts)
            out.append([Completion(t, "stop", 2, None, ll) for t, ll in zip(texts, logliks, strict=True)])
        return out


ITEM = {
    "question": "What is the capital of France?",
    "context": "Paris is the capital of France.",
    "answers": ["Paris"],
}


@pytest.mark.parametrize(
    ("estimator", "metric", "expected"),
    [("soft", "score", 0.75), ("hard", "score", 0.75), ("soft", "entropy", math.log(4))],
)
def test_context_containing_the_answer_gains_information(estimator, metric, expected):
    generator = ScriptedGenerator(["Paris"] * 4, ["Paris", "Lyon", "Rome", "Berlin"])
    engine = InfoGainEngine(generator, ExactEntailment(), num_generations=4, estimator=estimator, metric=metric)
    [result] = engine.compute([ITEM])
    assert result["error"] is None and result["score"] == pytest.approx(expected)
    details = result["details"]
    assert details["no_context"]["score"] == pytest.approx(0.25) and details["with_context"]["score"] == 1.0
    assert details["with_context"]["cluster_ids"] == [0, 0, 0, 0]
    assert details["no_context"]["entropy"]["discrete"] == pytest.approx(math.log(4))
    assert [s["text"] for s in details["no_context"]["samples"]] == ["Paris", "Lyon", "Rome", "Berlin"]
    assert details["no_context"]["sizes"] == {"responses": 4, "answers": 1}
    assert np.array(details["no_context"]["resp_entails_ans"]).shape == (4, 1)


def test_identical_samples_are_scored_once_and_far_below_the_naive_count():
    generator = ScriptedGenerator(["Paris"] * 10, ["Paris"] * 5 + ["Lyon"] * 5)
    engine = InfoGainEngine(generator, ExactEntailment(), num_generations=10)
    [result] = engine.compute([ITEM])
    checked = result["details"]["entailment_pairs_checked"]
    # distinct pairs: (Paris,Paris) (Lyon,Paris) (Paris,Lyon) (Lyon,Lyon)... at most 4 texts x 2 texts
    assert checked <= 4 and result["details"]["entailment_pairs_naive"] == naive_pair_count(10, 1) == 220


def test_likelihoods_weight_the_samples():
    generator = ScriptedGenerator(["Paris"] * 2, ["Paris", "Lyon"], logliks=[math.log(0.8), math.log(0.2)])
    [result] = InfoGainEngine(generator, ExactEntailment(), num_generations=2).compute([ITEM])
    assert result["details"]["no_context"]["score"] == pytest.approx(0.8)
    assert result["score"] == pytest.approx(1.0 - 0.8)


def test_one_bad_item_does_not_fail_the_batch():
    generator = ScriptedGenerator(["Paris"] * 2, ["Lyon"] * 2)
    items = [
        ITEM,
        {"question": "", "answers": ["x"]},
        {"question": "q", "answers": []},
        "not an object",
        {"question": "q", "answers": ["a"], "context": 5},
    ]
    results = InfoGainEngine(generator, ExactEntailment(), num_generations=2).compute(items)
    assert results[0]["error"] is None and results[0]["score"] == pytest.approx(1.0)
    assert "question" in results[1]["error"] and "answers" in results[2]["error"]
    assert "object" in results[3]["error"] and "context" in results[4]["error"]
    assert all(r["score"] is None for r in results[1:])


def test_context_is_cut_to_max_context_words():
    engine = InfoGainEngine(ScriptedGenerator([], []), ExactEntailment(), max_context_words=3)
    prompt = engine.prompt_for("Q?", "one two three four five")
    assert "Context: one two three\n" in prompt and "four" not in prompt
    giant = engine.prompt_for("Q?", "x" * 100_000)  # one enormous "word" is cut too
    assert "Context: " + "x" * 48 + "\n" in giant


def test_tiny_nli_reads_the_label_order_from_its_config():
    import torch
    from omegaconf import OmegaConf

    from conftest import ROOT

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_nli.yaml"))
    nli = NLIEntailment(cfg)
    pairs = [("A cat sleeps.", "An animal rests."), ("It rains.", "The sun shines.")]
    probs = nli.probs(pairs)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0)
    enc = nli.tokenizer([p for p, _ in pairs], [h for _, h in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        raw = torch.softmax(nli.model(**enc).logits, -1).numpy()
    assert np.allclose(probs, raw[:, [2, 1, 0]], atol=1e-6)  # config says 0=CONTRADICTION, 2=ENTAILMENT
    cache = PairCache(nli, chunk_size=1)
    cache.entail(["x", "x", "y"], ["z"])
    assert cache.checked == 2  # the duplicate pair was scored once


def test_real_generator_fills_likelihoods_and_drives_the_engine(tiny_model_cfg):
    from core.models.generation_engine import GenerationEngine

    generator = GenerationEngine(tiny_model_cfg)
    engine = InfoGainEngine(generator, ExactEntailment(), num_generations=3, max_new_tokens=4, sub_batch_size=4)
    results = engine.compute([ITEM, {**ITEM, "question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}])
    assert all(r["error"] is None and -1.0 <= r["score"] <= 1.0 for r in results)
    samples = results[0]["details"]["with_context"]["samples"]
    assert len(samples) == 3 and all(s["mean_loglik"] < 0 and s["length"] >= 1 for s in samples)
    assert generator.generate_calls == 1  # 2 items x 2 conditions = 4 prompts in one sub-batch


def test_embedding_entailment_embeds_each_text_once_and_a_batch_in_one_call():
    from core.models.embedding_engine import EmbeddingEngine
    from core.models.loading import MINILM_ID
    from infogain.entailment import EmbeddingEntailment

    embedder = EmbeddingEngine({"name_or_path": MINILM_ID})
    entailment = EmbeddingEntailment(embedder)
    first = entailment.probs([("Paris", "paris, France"), ("Paris", "Lyon")])
    calls = embedder.forward_calls
    again = entailment.probs([("Lyon", "Paris"), ("paris, France", "Paris")])  # cached texts only
    assert embedder.forward_calls == calls
    assert np.allclose(again[[1, 0]], first)  # cosine is symmetric: same numbers, from the cache
    cold = EmbeddingEntailment(EmbeddingEngine({"name_or_path": MINILM_ID}))
    assert np.allclose(cold.probs([("Lyon", "Paris")]), again[:1], atol=1e-6)
    # the engine embeds a whole batch's samples and answers in one call before measuring
    engine = InfoGainEngine(ScriptedGenerator(["Paris", "Paris"], ["Lyon", "Marseille"]), entailment, num_generations=2)
    before = embedder.forward_calls
    engine.compute([ITEM, {**ITEM, "question": "Capital of France, again?"}])
    assert embedder.forward_calls - before == 1
