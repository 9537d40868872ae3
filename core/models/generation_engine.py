"""``GenerationEngine``: the ``TextGenerator`` protocol over a Hugging Face causal LM in this process."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from core.models.constraints import check_format
from core.models.decoding import GREEDY_BELOW, DecodeLoop, Row, RowSpec
from core.models.generation import (
    Completion,
    Message,
    Prompt,
    PromptToken,
    SamplingParams,
    TokenLogprob,
    apply_stop,
)
from core.models.loading import (
    build_causal_lm,
    device_for,
    end_token_ids,
    has_random_weights,
    load_tokenizer,
    model_label,
)


class GenerationEngine:
    """Owns a causal LM and its tokenizer; generates for many prompts in one decode loop
    (``core.models.decoding``: KV cache, rows leave as they end and waiting ones join).

    Args:
        model: a model config node (``conf/model/*.yaml``).
        gpus: 0 for the CPU, otherwise the model goes on ``cuda``.
        max_batch_size: prompts decoded together at most (each with its ``n`` samples).
        max_batch_tokens: token positions (rows × (prompt + new tokens)) the batch may hold, which
            bounds the KV cache: rows wait for room, and one prompt whose ``n`` rows alone exceed
            it is refused (``ValueError``) before any model work.
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
        # decode loops run (one per ``complete``), for tests and /health
        self.generate_calls = 0
        # one model, one step at a time: ``complete`` and the server's scheduler share it
        self.lock = threading.Lock()

    def decode_loop(self, max_rows: int) -> DecodeLoop:
        """A decode loop over this engine's model holding at most ``max_rows`` rows."""
        return DecodeLoop(self.model, self.tokenizer, self.end_ids, max_rows, self.max_batch_tokens)

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
        return params.n if params.temperature >= GREEDY_BELOW else 1

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
        rows = self.rows(self.token_ids(prompts), params, stop)
        loop = self.decode_loop(self.max_batch_size * self.rows_per_prompt(params))
        with self.lock:
            loop.run(rows)
            self.generate_calls += 1
        return self.completions(rows, len(prompts), params, stop)

    def rows(
        self, ids: Sequence[list[int]], params: SamplingParams, stop: Sequence[str] | None, owner: object = None
    ) -> list[Row]:
        """The decode-loop rows of a request: ``rows_per_prompt`` per prompt, sharing one seeded
        generator when ``params.seed`` is set."""
        if params.response_format is not None:  # refused before any model work when it cannot be enforced
            check_format(params.response_format, self.tokenizer, int(self.model.config.vocab_size))
        generator = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        spec = RowSpec(
            max_new_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=tuple(s for s in stop or () if s),
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            prompt_logprobs=params.prompt_logprobs,
            response_format=params.response_format,
        )
        max_input = max(8, self.max_model_len - params.max_tokens)
        rows = []
        for prompt in ids:
            # An over-long prompt is cut as the tokenizer would (servers refuse one before it gets here).
            prompt = prompt[:max_input] if self.tokenizer.truncation_side == "right" else prompt[-max_input:]
            rows += [Row(list(prompt), spec, generator, owner) for _ in range(self.rows_per_prompt(params))]
        return rows

    def completions(
        self, rows: Sequence[Row], prompts: int, params: SamplingParams, stop: Sequence[str] | None
    ) -> list[list[Completion]]:
        """Decoded ``rows`` (from ``rows``) as ``params.n`` completions per prompt."""
        per_prompt = self.rows_per_prompt(params)
        done = [apply_stop(self._completion(r), stop) for r in rows]
        groups = [done[i * per_prompt : (i + 1) * per_prompt] for i in range(prompts)]
        return [group * (params.n // per_prompt) for group in groups]

    def _completion(self, row: Row) -> Completion:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        completion = Completion(text, "length" if row.finish == "length" else "stop", len(row.tokens), row.stop_found)
        if row.spec.logprobs:
            completion.set_logprobs(
                [
                    TokenLogprob(self._piece(t), value, self._alternatives(row.top[k]) if row.top else [])
                    for k, (t, value) in enumerate(zip(row.tokens, row.logprobs, strict=True))
                ]
            )
        if row.prompt_scores is not None:
            first = PromptToken(self._piece(row.prompt[0]), None, [], row.prompt[0], None, [])
            completion.prompt_logprobs = [first] + [
                PromptToken(self._piece(t), value, self._alternatives((ids, values)), t, rank, ids)
                for t, (value, rank, ids, values) in zip(row.prompt[1:], row.prompt_scores, strict=True)
            ]
        return completion

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _alternatives(self, top: tuple[list[int], list[float]]) -> list[tuple[str, float]]:
        return [(self._piece(t), v) for t, v in zip(*top, strict=True)]
