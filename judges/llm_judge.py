"""LLM-as-a-judge reward: a generator model grades each completion against its references.

For every (completion, reference) pair the judge prompt is rendered from a template and the
generator answers. In ``text`` mode ``REWARD: <score>`` is read from the reply (thinking blocks
removed, clamped to [0, 1]); in ``json`` mode it is the ``score`` of a reply whose JSON schema
the generator enforces while decoding; in ``logprobs`` mode the score is p(yes) of a yes/no answer, from
the first token's log-probabilities (see ``judges.prompts``). A completion's score is its best
score over the references. When the generation server fails the pair scores 0.0 (never an
exception into the trainer) and the failure is counted in ``stats`` and logged; a reply that
gives no score counts as a parse failure.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from core.models.generation_client import GenerationClient
from core.models.protocols import TextGenerator
from core.rewards.base import RewardSample, count_failure, mark_unscored, references
from core.serving.errors import ServiceError
from core.serving.http import chunks
from judges.prompts import judge_sampling, judge_score, render, resolve_template
from judges.references import filter_references

log = logging.getLogger(__name__)


class LLMJudgeReward:
    """Scores completions with a judge model.

    Args:
        generator: a ``GenerationEngine`` (in-process) or ``GenerationClient`` (OpenAI-compatible server).
        mode: ``text`` (parse ``REWARD: x``), ``json`` (``{"score", "reason"}``, schema enforced) or
            ``logprobs`` (p(yes) of one greedy token).
        prompt_template: ``default``, ``detailed``, ``yes_no`` or a custom string with the placeholders.
        temperature, top_p, max_new_tokens, enable_thinking: the judge's sampling in ``text`` and ``json`` modes.
        batch_size: judge prompts sent per generator call.

    Per-sample ``extra_info`` may override every argument above and ``server_url``, ``api_key``,
    ``timeout``, ``model_name``; ``problem`` fills ``{PROBLEM}`` (else the prompt is used).
    """

    name = "llm_judge"
    failure_keys = ("requests_failed", "parse_failures")
    failure_advice = {
        "parse_failures": "the judge gave no usable score for some samples; a tiny random judge never does: "
        "use a real one (model@judge_model=..., or judge=remote)",
    }

    def __init__(
        self,
        generator: TextGenerator,
        mode: str = "text",
        prompt_template: str = "default",
        temperature: float = 0.7,
        top_p: float = 0.8,
        max_new_tokens: int = 512,
        enable_thinking: bool = False,
        batch_size: int = 128,
    ):
        resolve_template(prompt_template)  # refuse an unknown template or mode before any scoring
        judge_sampling(mode, temperature, top_p, max_new_tokens)
        self.generator, self.mode = generator, mode
        self.defaults = {
            "prompt_template": prompt_template,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "max_new_tokens": int(max_new_tokens),
            "enable_thinking": bool(enable_thinking),
            "batch_size": int(batch_size),
        }
        self._clients: dict[tuple, GenerationClient] = {}
        self.stats = {"samples": 0, "judge_calls": 0, "requests_failed": 0, "parse_failures": 0}

    def _generator_for(self, info: dict):
        if not info.get("server_url"):
            name = info.get("model_name")
            if not name or not isinstance(self.generator, GenerationClient):  # one model in process
                return self.generator
            key = ("configured server", name)  # never equal to a server_url key below
            if key not in self._clients:
                self._clients[key] = self.generator.for_model(name)
            return self._clients[key]
        key = (info["server_url"], info.get("api_key"), info.get("timeout"), info.get("model_name"))
        if key not in self._clients:
            self._clients[key] = GenerationClient(
                info["server_url"],
                api_key=info.get("api_key"),
                timeout=float(info.get("timeout") or 60.0),
                model_name=info.get("model_name"),
            )
        return self._clients[key]

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        # (generator, sampling settings) -> [(sample index, judge prompt)]
        groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
        generators = {}
        for i, s in enumerate(samples):
            opts = {k: s.extra_info.get(k, v) for k, v in self.defaults.items()}
            generator = self._generator_for(s.extra_info)
            generators[id(generator)] = generator
            key = (
                id(generator),
                float(opts["temperature"]),
                float(opts["top_p"]),
                int(opts["max_new_tokens"]),
                bool(opts["enable_thinking"]),
                int(opts["batch_size"]),
            )
            problem = str(s.extra_info.get("problem") or s.prompt or "")
            for ref in filter_references(references(s.ground_truth), s.extra_info):
                groups[key].append((i, render(opts["prompt_template"], problem, ref, s.completion)))
        scores = [0.0] * len(samples)
        # why each sample's pairs gave no score; a sample leaves once one of its pairs scores
        unscored: dict[int, str] = {}
        scored: set[int] = set()
        for (gid, temperature, top_p, max_tokens, thinking, batch_size), pairs in groups.items():
            params = judge_sampling(self.mode, temperature, top_p, max_tokens)
            for part in chunks(pairs, batch_size):
                judged = self._judge(generators[gid], part, params, thinking)
                for (i, _prompt), (score, why) in zip(part, judged, strict=True):
                    if why is None:
                        scored.add(i)
                        scores[i] = max(scores[i], score)
                    else:
                        unscored[i] = why
        for i, why in unscored.items():
            if i not in scored:
                mark_unscored([i], why)
        self.stats["samples"] += len(samples)
        return scores

    def _judge(self, generator, part, params, thinking: bool) -> list[tuple[float, str | None]]:
        """Each pair's score, and why it has none (``None`` when it was scored)."""
        conversations = [[{"role": "user", "content": prompt}] for _, prompt in part]
        self.stats["judge_calls"] += len(conversations)
        try:
            replies = generator.chat(conversations, params, enable_thinking=thinking)
        except ServiceError as exc:
            count_failure(self.stats, "requests_failed")
            log.warning("LLM judge server failed (%s); scoring %d pairs 0.0", exc, len(part))
            return [(0.0, f"judge server failed: {exc}")] * len(part)
        scores = []
        for reply in replies:
            score = judge_score(self.mode, reply[0])
            if score is None:
                count_failure(self.stats, "parse_failures")
                scores.append((0.0, f"the judge's reply gave no score: {reply[0].text[:80]!r}"))
            else:
                scores.append((score, None))
        return scores
