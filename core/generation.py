"""Batched text generation with a Hugging Face causal LM (the in-process side of a generation server).

``GenerationEngine`` and the OpenAI-compatible ``GenerationClient`` (``core.generation_client``)
have the same ``complete``/``chat`` methods, so a judge or trainer can hold either.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from core.models import build_causal_lm, device_for, load_tokenizer, model_label

Message = Mapping[str, str]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; requests with equal params can share one ``generate`` call."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 512
    seed: int | None = None
    # Also return each completion's mean token log-likelihood (from the generation scores).
    logprobs: bool = False


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    completion_tokens: int
    stop_found: str | None = None
    mean_logprob: float | None = None


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, str | None]:
    """Cut ``text`` at the earliest occurrence of any stop string; return the text and that string."""
    best, found = len(text), None
    for s in stop or ():
        at = text.find(s) if s else -1
        if 0 <= at < best:
            best, found = at, s
    return text[:best], found


def apply_stop(completion: Completion, stop: Sequence[str] | None) -> Completion:
    """The completion cut at its first stop string (finish reason ``stop`` when one was found)."""
    text, found = cut_at_stop(completion.text, stop)
    if found is None:
        return completion
    return Completion(text, "stop", completion.completion_tokens, found, completion.mean_logprob)


class GenerationEngine:
    """Owns a causal LM and its tokenizer; generates for many prompts in one padded batch.

    Args:
        model: a model config node (``conf/model/*.yaml``).
        gpus: 0 for the CPU, otherwise the model goes on ``cuda``.
        max_batch_size: prompts per ``generate`` call (larger inputs are split).
    """

    def __init__(self, model: Mapping, gpus: int = 0, max_batch_size: int = 32):
        self.device = device_for(gpus)
        self.tokenizer = load_tokenizer(model)
        self.model = build_causal_lm(model, self.tokenizer, self.device)
        self.name = model_label(model)
        self.max_model_len = int(
            model.get("max_model_len") or getattr(self.model.config, "max_position_embeddings", 2048)
        )
        self.max_batch_size = max_batch_size
        self.generate_calls = 0
        self._lock = threading.Lock()

    def render_chat(self, messages: Sequence[Message], enable_thinking: bool | None = None) -> str:
        """The prompt text for a conversation, via the tokenizer's chat template."""
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, **extra
        )

    def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text`` (without special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] | None = None,
        enable_thinking: bool | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` assistant replies for each conversation."""
        return self.complete([self.render_chat(c, enable_thinking) for c in conversations], params, stop)

    def complete(
        self, prompts: Sequence[str], params: SamplingParams = SamplingParams(), stop: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """``params.n`` continuations for each prompt, cut at the first of ``stop``."""
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.max_batch_size):
            out.extend(self._generate(list(prompts[start : start + self.max_batch_size]), params))
        return [[apply_stop(c, stop) for c in group] for group in out]

    @torch.inference_mode()
    def _generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        max_input = max(8, self.max_model_len - params.max_tokens)
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_input, add_special_tokens=False
        )
        enc = enc.to(self.device)
        sampling = params.temperature > 0
        # Greedy decoding gives the same sequence n times (as vLLM does); generate it once.
        per_prompt = params.n if sampling else 1
        kwargs = {
            "do_sample": sampling,
            "max_new_tokens": params.max_tokens,
            "num_return_sequences": per_prompt,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.logprobs:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**enc, **kwargs)
            self.generate_calls += 1
        sequences = out.sequences if params.logprobs else out
        # Log-probabilities of the chosen tokens under the sampling distribution, from the scores
        # generate already computed (no second forward pass).
        token_logprobs = (
            self.model.compute_transition_scores(sequences, out.scores, normalize_logits=True).tolist()
            if params.logprobs
            else None
        )
        new_tokens = sequences[:, enc["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        completions = []
        for row, ids in enumerate(new_tokens):
            length = ids.index(eos) + 1 if eos in ids else len(ids)
            finished = eos in ids
            text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
            mean_logprob = sum(token_logprobs[row][:length]) / length if token_logprobs else None
            completions.append(Completion(text, "stop" if finished else "length", length, None, mean_logprob))
        groups = [completions[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
        return [group * (params.n // per_prompt) for group in groups]
