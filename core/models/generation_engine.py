"""``GenerationEngine``: the ``TextGenerator`` protocol over a Hugging Face causal LM in this process."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from core.models.generation import Completion, Message, Prompt, SamplingParams, TokenLogprob, apply_stop
from core.models.loading import (
    build_causal_lm,
    device_for,
    end_token_ids,
    has_random_weights,
    load_tokenizer,
    model_label,
)
from core.models.sampling import NucleusSampler
from core.serving.cancel import abandoned, check_abandoned


class LogprobRecorder(LogitsProcessor):
    """Records the model's log-probability of each token ``generate`` picks, as it generates.

    Placed among ``generate``'s logits processors (before temperature and top-p), it sees the
    model's distribution at every step; the token picked at step t shows up in ``input_ids`` at
    step t+1, so only one step's distribution is held at a time (a full ``output_scores`` would
    hold rows × steps × vocabulary floats: gigabytes for a 49k vocabulary).
    """

    def __init__(self, top: int = 0):
        self.top = top
        self._last: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.alternatives: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self.chosen.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        if self.top:
            values, indices = self._last.topk(self.top, dim=-1)
            self.alternatives.append((values.cpu(), indices.cpu()))
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] log-probabilities, once ``generate`` returned ``sequences``."""
        if self._last is not None:
            self.chosen.append(self._last.gather(1, sequences[:, -1:]).squeeze(1))
            self._last = None
        return torch.stack(self.chosen, dim=1).cpu()


class StopWhenAbandoned(StoppingCriteria):
    """Ends ``generate`` at the next step once nobody waits for its result (``core.serving.cancel``)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), abandoned(), dtype=torch.bool, device=input_ids.device)


class StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text holds one of ``stops``. It decodes each row's last
    tokens rather than matching token paths (transformers' ``stop_strings``), so any text works,
    also one the vocabulary has no token for (a newline for a WordPiece tokenizer)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        # a stop string of n characters spans at most n tokens (+2 for partly decoded bytes)
        self.tail = max((len(s) for s in self.stops), default=0) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.tail)
        texts = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class GenerationEngine:
    """Owns a causal LM and its tokenizer; generates for many prompts in one padded batch.

    Args:
        model: a model config node (``conf/model/*.yaml``).
        gpus: 0 for the CPU, otherwise the model goes on ``cuda``.
        max_batch_size: prompts per ``generate`` call (larger inputs are split).
        max_batch_tokens: token positions (rows × (prompt + new tokens)) one ``generate`` call may
            hold, which bounds the KV cache: inputs are split to fit, and one prompt whose ``n``
            rows alone exceed it is refused (``ValueError``) before any model work.
    """

    def __init__(self, model: Mapping, gpus: int = 0, max_batch_size: int = 32, max_batch_tokens: int = 65536):
        self.device = device_for(gpus)
        self.tokenizer = load_tokenizer(model)
        self.model = build_causal_lm(model, self.tokenizer, self.device)
        self.name = model_label(model)
        self.random_weights = has_random_weights(model, "generation")
        self.max_model_len = int(
            model.get("max_model_len") or getattr(self.model.config, "max_position_embeddings", 2048)
        )
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        self.end_ids = end_token_ids(self.tokenizer, self.model.generation_config)
        self.generate_calls = 0
        self._lock = threading.Lock()

    def render_chat(self, messages: Sequence[Message], enable_thinking: bool | None = None) -> str:
        """The prompt text for a conversation, via the tokenizer's chat template."""
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, **extra
        )

    def token_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Each prompt's token ids: texts are tokenised (no special tokens added), ids are taken
        as given (OpenAI's token-array prompts), after a check that the model has them."""
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else ())
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(next(encoded))
                continue
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary (0 to {self.vocab_size - 1})")
            out.append(list(p))
        return out

    def count_tokens(self, prompt: Prompt) -> int:
        """Number of tokens in a prompt (text without special tokens, or token ids)."""
        return len(self.token_ids([prompt])[0])

    def rows_per_prompt(self, params: SamplingParams) -> int:
        """Sequences decoded per prompt (greedy decoding gives the same one ``n`` times: decoded once)."""
        return params.n if params.temperature > 0 else 1

    def check_budget(self, prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse (``ValueError``) a prompt whose rows alone would not fit one ``generate`` call."""
        need = self.rows_per_prompt(params) * (prompt_tokens + params.max_tokens)
        if need > self.max_batch_tokens:
            raise ValueError(
                f"n × (prompt + max_tokens) = {need} token positions, more than the {self.max_batch_tokens} "
                "one batch may hold (max_batch_tokens); lower n or max_tokens"
            )

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
        self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams(), stop: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """``params.n`` continuations for each prompt, cut at the first of ``stop``."""
        out: list[list[Completion]] = []
        rows = self.token_ids(prompts)  # once: they size the calls and are their input
        step = self._prompts_per_call(rows, params)
        for start in range(0, len(rows), step):
            check_abandoned("generation")
            out.extend(self._generate(rows[start : start + step], params, stop))
        return [[apply_stop(c, stop) for c in group] for group in out]

    def _prompts_per_call(self, rows: list[list[int]], params: SamplingParams) -> int:
        longest = max((len(ids) for ids in rows), default=0)
        per_prompt = self.rows_per_prompt(params) * min(self.max_model_len, longest + params.max_tokens)
        return max(1, min(self.max_batch_size, self.max_batch_tokens // max(1, per_prompt)))

    @torch.inference_mode()
    def _generate(
        self, rows: list[list[int]], params: SamplingParams, stop: Sequence[str] | None
    ) -> list[list[Completion]]:
        max_input = max(8, self.max_model_len - params.max_tokens)
        # An over-long prompt is cut as the tokenizer would (servers refuse one before it gets here).
        rows = [r[:max_input] if self.tokenizer.truncation_side == "right" else r[-max_input:] for r in rows]
        enc = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        sampling = params.temperature > 0
        per_prompt = self.rows_per_prompt(params)
        enc = {k: v.repeat_interleave(per_prompt, dim=0).to(self.device) for k, v in enc.items()}
        recorder = LogprobRecorder(params.top_logprobs) if params.logprobs else None
        kwargs = {
            # Sampling happens in NucleusSampler: generate itself only takes the token it chose.
            "do_sample": False,
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            # Every end id stops a row, not only the tokenizer's eos.
            "eos_token_id": self.end_ids,
            "stopping_criteria": StoppingCriteriaList([StopWhenAbandoned()]),
        }
        if stop and any(stop):  # rows end at a stop string instead of running to max_tokens (cut after)
            kwargs["stopping_criteria"].append(StopOnStrings(self.tokenizer, stop, enc["input_ids"].shape[1]))
        processors = [recorder] if recorder else []  # first: it records the model's raw distribution
        if sampling:
            processors.append(NucleusSampler(params.temperature, params.top_p))
        kwargs["logits_processor"] = LogitsProcessorList(processors)
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            sequences = self.model.generate(**enc, **kwargs)
            self.generate_calls += 1
        check_abandoned("generation")  # cut short for nobody: no half-made completions
        token_logprobs = recorder.finish(sequences) if recorder else None
        new_tokens = sequences[:, enc["input_ids"].shape[1] :].tolist()
        completions = []
        for row, ids in enumerate(new_tokens):
            end = next((k for k, t in enumerate(ids) if t in self.end_ids), None)
            length = len(ids) if end is None else end + 1
            text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
            completion = Completion(text, "length" if end is None else "stop", length)
            if token_logprobs is not None:
                # Only the generated tokens up to and including the end id count, never padding.
                values = token_logprobs[row, :length].tolist()
                completion.set_logprobs(self._token_logprobs(recorder, row, ids[:length], values))
            completions.append(completion)
        groups = [completions[i * per_prompt : (i + 1) * per_prompt] for i in range(len(rows))]
        return [group * (params.n // per_prompt) for group in groups]

    def _token_logprobs(self, recorder: LogprobRecorder, row: int, ids: list[int], values: list[float]):
        out = []
        for step, (token, value) in enumerate(zip(ids, values, strict=True)):
            top = []
            if recorder.top:
                top_values, top_ids = recorder.alternatives[step]
                top = [
                    (self.tokenizer.decode([int(t)]), float(v))
                    for v, t in zip(top_values[row], top_ids[row], strict=True)
                ]
            out.append(TokenLogprob(self.tokenizer.decode([token]), value, top))
        return out
