"""The in-process information-gain engine: sample answers with and without context, measure.

``compute(items)`` takes ``{question, context, answers}`` dicts and returns, per item,
``{"score": ΔIG, "error": None, "details": {...}}`` or ``{"score": None, "error": "...", ...}``
for an item that cannot be scored (the others are unaffected). All items' prompts, both
conditions, are sampled together in sub-batches of ``sub_batch_size`` prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from core.models.generation import SamplingParams
from core.models.protocols import TextGenerator
from core.serving.cancel import check_abandoned
from infogain.entailment import PairCache
from infogain.measure import (
    ConditionResult,
    cluster,
    delta,
    entropies,
    hard_score,
    representatives_of,
    sample_weights,
    soft_score,
)

log = logging.getLogger(__name__)

# Brief answers are one line: a sample ends at the line break (or where the model starts a new
# question), so its likelihood is that of the answer, not of whatever the model writes after it.
ANSWER_STOPS = ("\n", "Question:")

PROMPTS = {
    "default": "Answer the following question as briefly as possible.\n{context}Question: {question}\nAnswer:",
    "sentence": "Answer the following question in a single brief but complete sentence.\n"
    "{context}Question: {question}\nAnswer:",
    "chat": "{context}Question: {question}\nGive only the answer, in a few words.",
}


def item_error(item, max_answers: int = 32, max_text_chars: int = 2000) -> str | None:
    """Why an item cannot be scored, or ``None``. The sizes that drive cost (the question's and
    each answer's length, the number of answers) are checked here, before any model work.

    >>> item_error({"question": "why " * 1000, "answers": ["a"]})
    '`question` has 4000 characters, more than the 2000 allowed'
    """
    if not isinstance(item, dict):
        return f"an item must be an object with question, context and answers, got {type(item).__name__}"
    if not isinstance(item.get("question"), str) or not item["question"].strip():
        return "`question` must be a non-empty string"
    if len(item["question"]) > max_text_chars:
        return f"`question` has {len(item['question'])} characters, more than the {max_text_chars} allowed"
    if not isinstance(item.get("context", ""), str):
        return "`context` must be a string"
    answers = item.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        return "`answers` must be a non-empty list of non-empty strings"
    if len(answers) > max_answers:
        return f"{len(answers)} answers, more than the {max_answers} allowed"
    if max(len(a) for a in answers) > max_text_chars:
        return f"an answer is longer than the {max_text_chars} characters allowed"
    return None


class InfoGainEngine:
    """Scores items by information gain.

    Args:
        generator: anything with ``complete(prompts, SamplingParams) -> [[Completion]]`` that fills
            ``mean_logprob`` (``core.models.generation_engine.GenerationEngine``).
        entailment: a scorer with ``probs(pairs)`` (``infogain.entailment``).
        estimator: ``soft`` (the reference's score) or ``hard`` (cluster weights).
        strictness: ``strict`` or ``loose`` bidirectional entailment, for clustering.
        metric: ``score`` (ΔIG of the estimator) or ``entropy`` (reduction of semantic entropy).
        seed: re-seeds sampling at every generate call, so the same items give the same samples
            in any process (served and in-process scores agree).
        max_answers, max_text_chars: per-item limits (answers; characters of the question and of
            each answer), refused in the item's error before any model work.
        Other args: the InfoGain reference service's ``IG_*`` settings.
    """

    def __init__(
        self,
        generator: TextGenerator,
        entailment,
        num_generations: int = 10,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        max_context_words: int = 4096,
        prompt_type: str = "default",
        sub_batch_size: int = 10,
        computation_chunk_size: int = 8,
        estimator: str = "soft",
        strictness: str = "strict",
        metric: str = "score",
        seed: int | None = None,
        max_answers: int = 32,
        max_text_chars: int = 2000,
    ):
        if prompt_type not in PROMPTS:
            raise ValueError(f"unknown prompt_type {prompt_type!r}; choose one of {', '.join(PROMPTS)}")
        if estimator not in ("soft", "hard"):
            raise ValueError(f"estimator must be 'soft' or 'hard', got {estimator!r}")
        if metric not in ("score", "entropy"):
            raise ValueError(f"metric must be 'score' or 'entropy', got {metric!r}")
        self.generator, self.entailment = generator, entailment
        self.params = SamplingParams(
            n=num_generations, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, logprobs=True, seed=seed
        )
        self.max_context_words, self.prompt = max_context_words, PROMPTS[prompt_type]
        self.chat = prompt_type == "chat"
        self.max_answers, self.max_text_chars = max_answers, max_text_chars
        self.sub_batch_size, self.chunk_size = sub_batch_size, computation_chunk_size
        self.estimator, self.strictness, self.metric = estimator, strictness, metric

    def health(self) -> dict:
        """This engine as ``/health`` reports it (a ``WorkerPool`` answers the same keys)."""
        device = str(getattr(self.generator, "device", "cpu"))
        return {
            "mode": "single-GPU" if device.startswith("cuda") else "single-process",
            "device": device,
            "num_workers": 1,
            "random_weights": self.random_weights(),
        }

    def random_weights(self) -> list[str]:
        """The roles (generator, entailment) held by a tiny random-weight model: ΔIG means nothing then."""
        parts = {"generator": self.generator, "entailment": self.entailment}
        return [role for role, part in parts.items() if getattr(part, "random_weights", False)]

    def prompt_for(self, question: str, context: str | None) -> str:
        """The brief-answer prompt, with the context cut to ``max_context_words`` words."""
        block = ""
        if context:
            # Words, then characters: one enormous "word" must not slip through either.
            kept = " ".join(context.split()[: self.max_context_words])[: self.max_context_words * 16]
            block = "Context: " + kept + "\n"
        return self.prompt.format(context=block, question=question.strip())

    def sample(self, prompts: Sequence[str]) -> list[list]:
        """``num_generations`` completions (with mean log-likelihoods) per prompt; the ``chat``
        prompt type goes through the generator's chat template, the others are continued as text."""
        out = []
        for start in range(0, len(prompts), self.sub_batch_size):
            check_abandoned("InfoGain sampling")
            part = list(prompts[start : start + self.sub_batch_size])
            if self.chat:
                out.extend(self.generator.chat([[{"role": "user", "content": p}] for p in part], self.params))
            else:
                out.extend(self.generator.complete(part, self.params, stop=ANSWER_STOPS))
        return out

    def compute(self, items: Sequence) -> list[dict]:
        """One ``{"score", "error", "details"}`` per item, in order."""
        errors = [item_error(it, self.max_answers, self.max_text_chars) for it in items]
        results: list[dict] = [{"score": None, "error": error, "details": None} for error in errors]
        valid = [i for i, r in enumerate(results) if r["error"] is None]
        prompts = [
            p
            for i in valid
            for p in (
                self.prompt_for(items[i]["question"], None),
                self.prompt_for(items[i]["question"], items[i].get("context")),
            )
        ]
        samples = self.sample(prompts)
        self._warm_entailment([items[i] for i in valid], samples)
        for k, i in enumerate(valid):
            try:
                results[i] = self._measure(items[i], samples[2 * k], samples[2 * k + 1])
            except Exception as exc:  # noqa: BLE001 - one item's failure is reported in errors[i]
                log.exception("item %d failed", i)
                results[i] = {"score": None, "error": f"{type(exc).__name__}: {exc}", "details": None}
        return results

    def _warm_entailment(self, items: Sequence, samples: list) -> None:
        """A scorer that embeds texts (``warm``) embeds every text of the batch in one call
        before the items are measured one by one."""
        warm = getattr(self.entailment, "warm", None)
        if warm is None:
            return
        texts = []
        for k, item in enumerate(items):
            prefix = entailment_prefix(item)
            texts += [prefix + c.text.strip() for c in samples[2 * k] + samples[2 * k + 1]]
            texts += [prefix + a.strip() for a in item["answers"]]
        warm(texts)

    def _condition(self, completions, answers: list[str], cache: PairCache) -> ConditionResult:
        texts = [c.text.strip() for c in completions]
        weights = sample_weights([c.mean_logprob for c in completions])
        resp_ans = cache.entail(texts, answers)
        ans_resp = cache.entail(answers, texts)
        ids = cluster(texts, cache, self.strictness)
        if self.estimator == "soft":
            score = soft_score(weights, resp_ans, ans_resp)
        else:
            score = hard_score(weights, ids, representatives_of(texts, ids), answers, cache, self.strictness)
        return ConditionResult(score, weights, ids, entropies(ids, weights), resp_ans, ans_resp)

    def _measure(self, item: dict, base_samples, ctx_samples) -> dict:
        answers = [a.strip() for a in item["answers"]]
        cache = PairCache(self.entailment, self.chunk_size, prefix=entailment_prefix(item))
        base = self._condition(base_samples, answers, cache)
        ctx = self._condition(ctx_samples, answers, cache)
        n, a = len(base_samples), len(answers)

        def summary(samples, result: ConditionResult) -> dict:
            return {
                "samples": [
                    {"text": c.text.strip(), "mean_loglik": c.mean_logprob, "length": c.completion_tokens}
                    for c in samples
                ],
                "score": result.score,
                "weights": result.weights.tolist(),
                "cluster_ids": result.cluster_ids,
                "entropy": result.entropy,
                "resp_entails_ans": result.resp_entails_ans.tolist(),
                "ans_entails_resp": result.ans_entails_resp.tolist(),
                "sizes": {"responses": len(samples), "answers": a},
            }

        details = {
            "with_context": summary(ctx_samples, ctx),
            "no_context": summary(base_samples, base),
            "estimator": self.estimator,
            "metric": self.metric,
            "entailment_pairs_checked": cache.checked,
            "entailment_pairs_naive": naive_pair_count(n, a),
        }
        return {"score": float(delta(base, ctx, self.metric)), "error": None, "details": details}


def entailment_prefix(item: dict) -> str:
    """What precedes both texts of an entailment pair: the question, so that short answers are
    judged in context."""
    return item["question"].strip() + " "


def naive_pair_count(n_samples: int, n_answers: int) -> int:
    """Entailment calls per item (both conditions) of a scorer that clusters by comparing every
    ordered pair of samples, plus both directions between each sample and each answer."""
    return 2 * (n_samples * (n_samples - 1) + 2 * n_samples * n_answers)
