"""The HTTP side of generation: any OpenAI-compatible server (vLLM, or ``service=llm_judge``).

Same ``chat``/``complete`` methods as ``GenerationEngine``. Chat conversations go one request
each (that is the chat API), sent concurrently so the server can batch them; plain prompts go
as lists to ``/v1/completions``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from core.models.generation import Completion, Message, PromptToken, SamplingParams, TokenLogprob
from core.serving.http import HTTPClient, chunks


def _token_logprobs(logprobs: dict | None) -> list[TokenLogprob] | None:
    """The choice's ``logprobs`` in either OpenAI shape (chat ``content`` list, or completions' arrays)."""
    if not logprobs:
        return None
    if "content" in logprobs:
        return [
            TokenLogprob(t["token"], t["logprob"], [(a["token"], a["logprob"]) for a in t.get("top_logprobs") or []])
            for t in logprobs["content"] or []
        ]
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    # (an echoed prompt's first token has a null log-probability and no alternatives)
    return [
        TokenLogprob(token, value, list((top or {}).items()))
        for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True)
    ]


def _completion(choice: dict, tokens: int) -> Completion:
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content") or ""
    stop_reason = choice.get("stop_reason")
    completion = Completion(
        text, choice.get("finish_reason") or "stop", tokens, stop_reason if isinstance(stop_reason, str) else None
    )
    logprobs = _token_logprobs(choice.get("logprobs"))
    if logprobs and logprobs[0].logprob is None:  # echoed: split by _split_echo
        completion.logprobs = logprobs
    elif logprobs:
        completion.set_logprobs(logprobs)
    elif logprobs is not None:
        completion.logprobs = logprobs
    return completion


def _split_echo(completion: Completion, prompt: str, prompt_tokens: int, keep_logprobs: bool) -> Completion:
    """An echoed choice (``echo: true``) of a one-prompt request cut back into the prompt's
    ``prompt_tokens`` scored tokens and the completion."""
    tokens = completion.logprobs or []
    completion.prompt_logprobs = [PromptToken(t.token, t.logprob, t.top) for t in tokens[:prompt_tokens]]
    completion.text = completion.text[len(prompt) :]
    if keep_logprobs:
        completion.set_logprobs(tokens[prompt_tokens:])
    else:
        completion.logprobs = completion.mean_logprob = None
    return completion


def _choices_by_prompt(body: dict, n_prompts: int, n: int) -> list[list[Completion]]:
    choices = sorted(body.get("choices", []), key=lambda c: c.get("index", 0))
    if len(choices) != n_prompts * n:
        raise ValueError(f"server returned {len(choices)} choices, expected {n_prompts * n}")
    per_choice = int((body.get("usage") or {}).get("completion_tokens", 0)) // max(1, len(choices))
    flat = [_completion(c, per_choice) for c in choices]
    return [flat[i * n : (i + 1) * n] for i in range(n_prompts)]


class GenerationClient:
    """OpenAI-compatible generation over HTTP.

    Args:
        url: server base URL (``/v1/...`` is appended), or several replicas' (a list, or
            comma-separated): requests spread over them.
        model_name: model to ask for; ``None`` uses the first model the server lists.
        concurrency: chat requests in flight at once.
        prompts_per_request: prompts per ``/v1/completions`` request.
        Other args configure the pooled ``HTTPClient``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        model_name: str | None = None,
        concurrency: int = 32,
        prompts_per_request: int = 64,
    ):
        self.http = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.url = self.http.base_url
        self._model_name = model_name
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request

    @property
    def name(self) -> str:
        """The served model's name (asked from ``/v1/models`` once when not configured)."""
        if self._model_name is None:
            models = self.http.get("/v1/models").get("data") or []
            if not models:
                raise ValueError(f"{self.url}/v1/models lists no model")
            self._model_name = models[0]["id"]
        return self._model_name

    def for_model(self, model_name: str) -> GenerationClient:
        """This client's server and connection pool, asking for ``model_name`` instead."""
        twin = copy.copy(self)
        twin._model_name = model_name
        return twin

    def _sampling(self, params: SamplingParams, stop: Sequence[str] | None, chat: bool) -> dict:
        body = {
            "model": self.name,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.response_format is not None:  # back into OpenAI's shape
            spec = json.loads(params.response_format)
            body["response_format"] = (
                {"type": "json_schema", "json_schema": {"name": "reply", "schema": spec["schema"]}}
                if spec["type"] == "json_schema"
                else spec
            )
        if stop:
            body["stop"] = list(stop)
        if params.logprobs and chat:
            body.update(logprobs=True, top_logprobs=params.top_logprobs)
        elif params.logprobs:
            body["logprobs"] = params.top_logprobs
        if params.prompt_logprobs is not None and not chat:
            # OpenAI's echo, which vLLM and our server answer alike (vLLM's own prompt_logprobs
            # does not say which of its entries is the prompt's token)
            body.update(echo=True, logprobs=max(params.top_logprobs, params.prompt_logprobs))
        return body

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] | None = None,
        enable_thinking: bool | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` assistant replies for each conversation."""
        base = self._sampling(params, stop, chat=True)
        if enable_thinking is not None:
            base["chat_template_kwargs"] = {"enable_thinking": enable_thinking}

        def one(messages):
            body = self.http.post("/v1/chat/completions", {**base, "messages": [dict(m) for m in messages]})
            return _choices_by_prompt(body, 1, params.n)[0]

        if len(conversations) <= 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))

    def complete(
        self, prompts: Sequence[str], params: SamplingParams = SamplingParams(), stop: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """``params.n`` continuations for each prompt; with ``params.prompt_logprobs``, each
        completion also carries its prompt's tokens, scored (``Completion.prompt_logprobs``)."""
        base = self._sampling(params, stop, chat=False)
        if params.prompt_logprobs is not None:
            # one prompt a request (sent concurrently), so the answer's prompt_tokens says where
            # each echoed prompt ends, whatever the tokenizer
            def scored(prompt: str) -> list[Completion]:
                body = self.http.post("/v1/completions", {**base, "prompt": prompt})
                tokens = int(body["usage"]["prompt_tokens"])
                return [
                    _split_echo(c, prompt, tokens, params.logprobs) for c in _choices_by_prompt(body, 1, params.n)[0]
                ]

            with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
                return list(pool.map(scored, prompts))
        out: list[list[Completion]] = []
        for part in chunks(list(prompts), self.prompts_per_request):
            body = self.http.post("/v1/completions", {**base, "prompt": list(part)})
            out.extend(_choices_by_prompt(body, len(part), params.n))
        return out

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()
