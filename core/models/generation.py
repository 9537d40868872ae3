"""Text generation: the values the ``TextGenerator`` protocol (``core.models.protocols``) speaks in.

Met by ``GenerationEngine`` (``generation_engine``: a Hugging Face causal LM in this process) and
``GenerationClient`` (``generation_client``: any OpenAI-compatible server, vLLM or ours from
``generation_app``), so a judge, InfoGain or a trainer holds either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

Message = Mapping[str, str]
# A prompt: text, or the token ids of one (OpenAI's and vLLM's token-array prompts).
Prompt = str | list[int]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; requests with equal params can share one ``generate`` call."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 512
    seed: int | None = None
    # Also return each generated token's log-probability and the completion's mean (``mean_logprob``).
    logprobs: bool = False
    # With ``logprobs``: this many most likely tokens at each position (OpenAI's ``top_logprobs``).
    top_logprobs: int = 0
    # Also score the prompt: each prompt token's log-probability given those before it, with this
    # many most likely alternatives (vLLM's ``prompt_logprobs``; OpenAI's ``echo`` with ``logprobs``).
    prompt_logprobs: int | None = None
    # OpenAI's response_format the output must follow, as ``core.models.constraints.response_format_key``
    # gives it (canonical JSON text); None: free text.
    response_format: str | None = None


@dataclass
class TokenLogprob:
    """A generated token, its log-probability under the model, and the most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class PromptToken:
    """A prompt token and its log-probability given the tokens before it (``None`` for the first).

    ``token_id`` and ``rank`` (1 = the model's most likely token there) are known in process and
    from vLLM-shaped answers; ``top`` holds the most likely alternatives as (token, log-probability).
    """

    token: str
    logprob: float | None
    top: list[tuple[str, float]]
    token_id: int | None = None
    rank: int | None = None
    top_ids: list[int] | None = None


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    completion_tokens: int
    stop_found: str | None = None
    mean_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    # with ``SamplingParams.prompt_logprobs``: the prompt's tokens, scored
    prompt_logprobs: list[PromptToken] | None = None

    def set_logprobs(self, tokens: list[TokenLogprob]) -> None:
        """Attach the tokens' log-probabilities; their mean becomes ``mean_logprob`` (0.0 for none)."""
        self.logprobs = tokens
        self.mean_logprob = sum(t.logprob for t in tokens) / len(tokens) if tokens else 0.0


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, str | None]:
    """Cut ``text`` at the earliest occurrence of any stop string; return the text and that string."""
    best, found = len(text), None
    for s in stop or ():
        at = text.find(s) if s else -1
        if 0 <= at < best:
            best, found = at, s
    return text[:best], found


def apply_stop(completion: Completion, stop: Sequence[str] | None) -> Completion:
    """The completion cut at its first stop string (finish reason ``stop`` when one was found);
    token log-probabilities, their mean and the token count then cover only the kept text."""
    text, found = cut_at_stop(completion.text, stop)
    if found is None:
        return completion
    cut = replace(completion, text=text, finish_reason="stop", stop_found=found)
    if completion.logprobs:
        kept, at = [], 0
        for token in completion.logprobs:
            if at >= len(text):
                break
            kept.append(token)
            at += len(token.token)
        cut.set_logprobs(kept)
        cut.completion_tokens = len(kept)
    return cut
