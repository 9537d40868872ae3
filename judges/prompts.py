"""Judge prompt templates, the ``REWARD: <score>`` answer format, and yes/no scoring from log-probabilities.

Two ways to read a judge:

* ``text``: the judge writes a reply ending in ``REWARD: <score>`` (``default``/``detailed``
  templates); large judges do this well, small ones rarely write the line at all.
* ``logprobs``: the judge is asked a yes/no question (``yes_no`` template) and the score is
  p(yes) / (p(yes) + p(no)) of its first token, read from the OpenAI API's ``top_logprobs``
  (which vLLM serves too); it needs one generated token and works with small judges.
* ``json``: the judge replies with ``{"score": <0 to 1>, "reason": "..."}``, enforced while it
  decodes (OpenAI's ``response_format`` with a JSON schema, which vLLM serves with guided decoding
  and our server with llguidance), so every reply parses (``json`` template).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from core.models.constraints import response_format_key
from core.models.generation import Completion, SamplingParams

PLACEHOLDERS = ("{PROBLEM}", "{REFERENCE_SOLUTION}", "{CANDIDATE_SOLUTION}")

TEMPLATES = {
    "default": (
        "You are grading a candidate solution against a reference solution.\n\n"
        "Problem:\n{PROBLEM}\n\n"
        "Reference solution:\n{REFERENCE_SOLUTION}\n\n"
        "Candidate solution:\n{CANDIDATE_SOLUTION}\n\n"
        "How well does the candidate match the reference in meaning and correctness? "
        "Answer with a single line `REWARD: <score>`, where <score> is a number between 0 and 1."
    ),
    "detailed": (
        "You are an expert evaluator. Compare the candidate solution with the reference solution.\n\n"
        "Problem:\n{PROBLEM}\n\n"
        "Reference solution:\n{REFERENCE_SOLUTION}\n\n"
        "Candidate solution:\n{CANDIDATE_SOLUTION}\n\n"
        "Work through these steps:\n"
        "1. State the key result and reasoning of the reference.\n"
        "2. Check whether the candidate reaches the same result.\n"
        "3. Note any errors, omissions or unsupported claims in the candidate.\n"
        "4. Weigh correctness first, then completeness, then clarity.\n\n"
        "End with a final line `REWARD: <score>`, where <score> is a number between 0 and 1 "
        "(1 = fully equivalent and correct, 0 = wrong or unrelated)."
    ),
    "yes_no": (
        "Question: {PROBLEM}\n"
        "Reference answer: {REFERENCE_SOLUTION}\n"
        "Candidate answer: {CANDIDATE_SOLUTION}\n"
        "Is the candidate answer correct? Answer yes or no."
    ),
    "json": (
        "Question: {PROBLEM}\n"
        "Reference answer: {REFERENCE_SOLUTION}\n"
        "Candidate answer: {CANDIDATE_SOLUTION}\n"
        "How correct is the candidate answer? Reply in JSON with a score between 0 (wrong) and 1 "
        "(correct) and a short reason."
    ),
}
MODES = ("text", "logprobs", "json")
# The reply json mode enforces: a score in [0, 1] and a short reason.
JSON_REPLY = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "reason": {"type": "string", "maxLength": 160},
    },
    "required": ["score", "reason"],
    "additionalProperties": False,
}
# Alternatives read at the first generated position in logprobs mode (vLLM's default cap is 20).
TOP_LOGPROBS = 20

_REWARD = re.compile(r"REWARD\s*[:=]\s*\**\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def resolve_template(template: str) -> str:
    """A template by name (``default``, ``detailed``), or a custom template string.

    A custom template must contain ``{CANDIDATE_SOLUTION}`` and ``{REFERENCE_SOLUTION}``;
    anything else is refused with the valid choices, rather than silently judged wrong.
    """
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{CANDIDATE_SOLUTION}" in template and "{REFERENCE_SOLUTION}" in template:
        return template
    raise ValueError(
        f"unknown prompt template {template[:60]!r}: use one of {', '.join(TEMPLATES)}, "
        f"or a template string containing {', '.join(PLACEHOLDERS)}"
    )


def render(template: str, problem: str, reference: str, candidate: str) -> str:
    """Fill the placeholders (plain replacement, so other braces in a custom template are kept)."""
    return (
        resolve_template(template)
        .replace("{PROBLEM}", problem)
        .replace("{REFERENCE_SOLUTION}", reference)
        .replace("{CANDIDATE_SOLUTION}", candidate)
    )


def strip_thinking(text: str) -> str:
    """Remove ``<think>…</think>`` blocks; text before a lone ``</think>`` is thinking too
    (templates that open the block in the prompt leave only the closing tag in the reply)."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    return text


def parse_reward(text: str) -> float | None:
    """The last ``REWARD: x`` in the reply (thinking removed), clamped to [0, 1]; None if absent.

    >>> parse_reward("<think>REWARD: 0.1</think> The answers agree. REWARD: 0.9")
    0.9
    >>> parse_reward("REWARD: 7")
    1.0
    """
    found = _REWARD.findall(strip_thinking(text))
    if not found:
        return None
    return min(1.0, max(0.0, float(found[-1])))


def yes_probability(top: Sequence[tuple[str, float]]) -> float | None:
    """p(yes) / (p(yes) + p(no)) over the first token's alternatives ``(token, logprob)``, with
    "Yes", " yes", "YES" and the like pooled; None when neither answer is among them.

    >>> round(yes_probability([("Yes", math.log(0.6)), (" no", math.log(0.2)), ("The", math.log(0.1))]), 3)
    0.75
    """
    yes = sum(math.exp(lp) for token, lp in top if token.strip().lower() == "yes")
    no = sum(math.exp(lp) for token, lp in top if token.strip().lower() == "no")
    return yes / (yes + no) if yes + no > 0 else None


def judge_sampling(mode: str, temperature: float, top_p: float, max_tokens: int) -> SamplingParams:
    """How the judge generates: the given sampling in ``text`` mode, with the reply's JSON schema
    enforced in ``json`` mode, one greedy token with its alternatives in ``logprobs`` mode."""
    if mode not in MODES:
        raise ValueError(f"judge mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "logprobs":
        return SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
    if mode == "json":
        reply = response_format_key({"type": "json_schema", "json_schema": {"name": "judgement", "schema": JSON_REPLY}})
        return SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, response_format=reply)
    return SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)


def judge_score(mode: str, completion: Completion) -> float | None:
    """The score a judge's answer gives in ``mode``, or None when it gives none."""
    if mode == "text":
        return parse_reward(completion.text)
    if mode == "json":
        try:
            score = json.loads(completion.text)["score"]
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens, or a server that ignored the schema
            return None
        return min(1.0, max(0.0, float(score))) if isinstance(score, (int, float)) else None
    if not completion.logprobs:  # a server that ignored the logprobs request
        return None
    return yes_probability(completion.logprobs[0].top)
