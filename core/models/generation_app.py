"""An OpenAI-compatible generation server over a ``GenerationEngine`` (``service=llm_judge``
serves it with the judge's route added).

Routes, as vLLM's OpenAI server answers them:

* ``GET /v1/models``
* ``POST /v1/chat/completions`` ``{messages, n, temperature, top_p, max_tokens, stop, seed,
  logprobs, top_logprobs, stream, stream_options, chat_template_kwargs: {enable_thinking}}``
* ``POST /v1/completions`` ``{prompt: str | [str] | [int] | [[int]], logprobs: int, ...same sampling fields}``
  (token-id prompts are used as given)
* ``GET /health``, ``GET /metrics`` (shared kit)

Requests are batched at the level of decode steps (``scheduling: iteration``,
``generation_scheduler``): a new request joins the running batch at the next step and leaves it
when its rows end. ``scheduling: batch`` merges concurrent requests with equal settings into one
decode that runs until its last row ends (the whole-batch baseline). Log-probabilities
come in vLLM's shapes (chat: ``logprobs.content[].top_logprobs``; completions: ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``). ``stream: true`` answers as server-sent
events once the completion is done (one content chunk per choice, then ``[DONE]``). Request
fields this server cannot honour (tools, response formats, penalties, ...) are refused with a
400 that names them, rather than silently ignored.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema, field_validator

from core.models.constraints import response_format_key
from core.models.generation import Completion, Prompt, PromptToken, SamplingParams, TokenLogprob
from core.models.generation_engine import GenerationEngine
from core.models.generation_scheduler import GenerationScheduler
from core.serving.app import ServerSettings, add_batcher, batch_metrics, check_batch_size, create_app
from core.serving.errors import APIError
from core.serving.schemas import ModelList

log = logging.getLogger(__name__)


class TextPart(BaseModel):
    """A text part of a message's content list (images are not served here)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


def _json_number(value):
    """Numbers come as JSON numbers: ``"5"`` or ``true`` is refused, not read as 5 or 1."""
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    return value


# OpenAI fields this server does not implement -> their values that change nothing; any other
# value is refused with a 400 that names the field (the schema documents only these values).
_NO_OP_VALUES = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


# Fields read as numbers (``logprobs`` is one in completions, a boolean in chat completions).
_NUMBERS = {
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "top_logprobs",
    "prompt_logprobs",
}


def _unsupported(field: str):
    return Annotated[Any, WithJsonSchema({"enum": list(_NO_OP_VALUES[field])})]


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the reply must satisfy."""

    name: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Sampling(BaseModel):
    """Sampling fields shared by both generation routes. Fields it does not know are accepted and
    logged once per name (as vLLM does), so a client's extra options never fail a request."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # 0: score the prompt only (with ``echo`` or ``prompt_logprobs``), as vLLM answers it
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    # torch seeds are 64-bit; larger values are refused (422), never an overflow inside the model call.
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: dict | None = None
    # vLLM's: each prompt token's log-probability given those before it, and this many alternatives
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    tools: _unsupported("tools") = None
    tool_choice: _unsupported("tool_choice") = None
    functions: _unsupported("functions") = None
    function_call: _unsupported("function_call") = None
    # OpenAI's structured outputs, enforced while decoding (core.models.constraints)
    response_format: ResponseFormat | None = None
    logit_bias: _unsupported("logit_bias") = None
    presence_penalty: _unsupported("presence_penalty") = None
    frequency_penalty: _unsupported("frequency_penalty") = None
    best_of: _unsupported("best_of") = None
    echo: _unsupported("echo") = None
    suffix: _unsupported("suffix") = None
    # fields of _NO_OP_VALUES that a route does implement
    supported: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value, info):
        return _json_number(value) if info.field_name in _NUMBERS else value


def refuse_unsupported(req: Sampling) -> None:
    """400 naming every field that asks for something this server does not do."""
    asked = [
        name for name, no_ops in _NO_OP_VALUES.items() if name not in req.supported and getattr(req, name) not in no_ops
    ]
    if asked:
        raise APIError(400, f"not supported by this server: {', '.join(asked)}; leave them unset")


class ChatRequest(Sampling):
    """``/v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1},
    ]
}


class CompletionRequest(Sampling):
    """``/v1/completions`` body."""

    # text, texts, or token ids (one prompt as a list of ids, several as a list of such lists);
    # an empty one is refused by the route, with its index
    prompt: Annotated[str | list[str] | list[StrictInt] | list[list[StrictInt]], WithJsonSchema(PROMPT_SCHEMA)]
    logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI's: the prompt comes back before the completion, in the text and (with ``logprobs``)
    # its tokens in the log-probabilities, the first one's ``null``
    echo: StrictBool = False
    supported: ClassVar[frozenset[str]] = frozenset({"echo"})

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_is_a_number(cls, value):
        return _json_number(value)


class Usage(BaseModel):
    """Token counts of a completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None
    logprobs: dict | None


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"]
    content: str


class ChatChoice(_Choice):
    """One chat completion choice."""

    message: AssistantMessage


class TextChoice(_Choice):
    """One text completion choice."""

    text: str
    # vLLM's shape: null for the first prompt token, then {token id: {logprob, rank, decoded_token}}
    prompt_logprobs: list[dict | None] | None = None


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Completion):
    """``POST /v1/chat/completions`` (``stream: false``)."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    prompt_logprobs: list[dict | None] | None = None


class TextCompletion(_Completion):
    """``POST /v1/completions`` (``stream: false``)."""

    object: Literal["text_completion"]
    choices: list[TextChoice]


def _or_stream(model: type[BaseModel]) -> dict:
    """The 200 answer of a generation route: the JSON body, or server-sent events with ``stream: true``
    (each event's ``data`` a JSON chunk, the last one ``[DONE]``)."""
    event = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {**event, "required": ["data"]}}}}}


def _chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]} for t in tokens
        ]
    }


def _completion_logprobs(tokens: list[TokenLogprob], prompt: list[PromptToken] = (), top: int = 0) -> dict:
    """Completions' log-probability arrays; with ``echo``, the ``prompt`` tokens first (the first
    one's log-probability and alternatives ``null``, the others' ``top`` alternatives)."""
    offsets, at = [], 0
    for t in [*prompt, *tokens]:
        offsets.append(at)
        at += len(t.token)
    prompt_top = [None if t.logprob is None else dict(t.top[:top]) for t in prompt]
    return {
        "text_offset": offsets,
        "token_logprobs": [t.logprob for t in prompt] + [t.logprob for t in tokens],
        "tokens": [t.token for t in prompt] + [t.token for t in tokens],
        "top_logprobs": prompt_top + [dict(t.top) for t in tokens],
    }


def _vllm_prompt_logprobs(tokens: list[PromptToken]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: ``null`` for the first token, then per token a dict by token id
    of the token itself and its most likely alternatives: ``{logprob, rank, decoded_token}``."""
    out: list[dict | None] = [None]
    for t in tokens[1:]:
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": t.rank, "decoded_token": t.token}}
        for rank, (token_id, (piece, value)) in enumerate(zip(t.top_ids or [], t.top, strict=True), start=1):
            entry.setdefault(str(token_id), {"logprob": value, "rank": rank, "decoded_token": piece})
        out.append(entry)
    return out


def _choice(
    index: int, c: Completion, chat: bool, echo: str | None = None, top: int = 0, prompt_logprobs: bool = False
) -> dict:
    """One choice; ``echo`` is the prompt's text, which then comes first (completions), with the
    prompt tokens' ``top`` alternatives; ``prompt_logprobs`` adds vLLM's field of that name."""
    logprobs = None
    if c.logprobs is not None:
        if chat:
            logprobs = _chat_logprobs(c.logprobs)
        else:
            logprobs = _completion_logprobs(c.logprobs, c.prompt_logprobs if echo is not None else (), top)
    body = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_found, "logprobs": logprobs}
    if chat:
        body["message"] = {"role": "assistant", "content": c.text}
    else:
        body["text"] = c.text if echo is None else echo + c.text
        if prompt_logprobs:
            body["prompt_logprobs"] = _vllm_prompt_logprobs(c.prompt_logprobs)
    return body


def _sse(body: dict, chat: bool, include_usage: bool) -> StreamingResponse:
    """A finished completion as OpenAI's stream of chunks (server-sent events)."""
    head = {k: body[k] for k in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    def events():
        for c in body["choices"]:
            base = {"index": c["index"], "logprobs": None, "finish_reason": None}
            if chat:
                yield chunk([{**base, "delta": {"role": "assistant", "content": ""}}])
                yield chunk([{**base, "delta": {"content": c["message"]["content"]}, "logprobs": c["logprobs"]}])
                yield chunk([{**base, "delta": {}, "finish_reason": c["finish_reason"]}])
            else:
                yield chunk([{**base, "text": c["text"], "logprobs": c["logprobs"]}])
                yield chunk([{**base, "text": "", "finish_reason": c["finish_reason"]}])
        if include_usage:
            yield chunk([], usage=body["usage"])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def generation_app(
    engine: GenerationEngine,
    settings: ServerSettings,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    default_max_tokens: int = 512,
    title: str = "generation",
    scheduling: Literal["iteration", "batch"] = "iteration",
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``. ``app.state.generate(prompts, params, stop)``
    (``(completions per prompt, prompt tokens)``) lets a caller add routes over the same model
    calls (the judge's ``/judge``). ``max_batch_size``: rows decoded together; ``max_wait_ms``:
    how long a request that finds the model idle waits for more to share its prefill (the
    whole-batch mode: to merge)."""
    app = create_app(
        title,
        settings,
        metrics_namespace="generation",
        health=lambda: {"model": engine.name, "device": str(engine.device), "random_weights": engine.random_weights},
    )
    if scheduling == "iteration":
        scheduler = GenerationScheduler(engine, max_batch_size, batch_metrics(app, max_batch_size), max_wait_ms)
        app.state.shutdown_hooks.append(scheduler.close)
        decode = scheduler.submit
    elif scheduling == "batch":
        batcher = add_batcher(app, lambda ids, key: engine.complete(ids, *key), max_batch_size, max_wait_ms)

        async def decode(ids, params, stop):
            return await batcher.submit(ids, key=(params, tuple(stop or ())))
    else:
        raise ValueError(f"scheduling must be 'iteration' or 'batch', not {scheduling!r}")

    ignored: set[str] = set()

    def sampling(req: Sampling, default_tokens: int, top_logprobs: int | None) -> SamplingParams:
        refuse_unsupported(req)
        for name in sorted(set(req.model_extra or ()) - ignored):
            ignored.add(name)
            log.warning("%s: request field %r is not known to this server and is ignored", title, name)
        if req.model is not None and req.model != engine.name:
            raise APIError(
                404, f"The model `{req.model}` does not exist; this server serves `{engine.name}`", "not_found"
            )
        max_tokens = next(v for v in (req.max_completion_tokens, req.max_tokens, default_tokens) if v is not None)
        if max_tokens >= engine.max_model_len:
            raise APIError(400, f"max_tokens {max_tokens} must be below the model's context {engine.max_model_len}")
        response_format = None
        if req.response_format is not None:
            if req.response_format.type == "json_schema" and req.response_format.json_schema is None:
                raise APIError(400, "response_format json_schema needs {json_schema: {name, schema}}")
            response_format = response_format_key(req.response_format.model_dump(by_alias=True))
        prompt_logprobs = req.prompt_logprobs
        if getattr(req, "echo", False) and top_logprobs is not None:  # echoed tokens carry log-probabilities
            prompt_logprobs = max(prompt_logprobs or 0, top_logprobs)
        return SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=max_tokens,
            seed=req.seed,
            logprobs=top_logprobs is not None,
            top_logprobs=top_logprobs or 0,
            prompt_logprobs=prompt_logprobs,
            response_format=response_format,
        )

    def check_prompts(prompts: list[Prompt], params: SamplingParams) -> list[list[int]]:
        """The prompts' token ids; 400 for an empty prompt or one that does not fit the context
        with ``max_tokens`` (as vLLM answers: never a silently truncated prompt), or whose ``n``
        rows would not fit one batch."""
        max_tokens = params.max_tokens
        check_batch_size(len(prompts), settings, "prompt")
        if not all(prompts):
            raise APIError(400, f"prompt {[bool(p) for p in prompts].index(False)} is empty")
        ids = engine.token_ids(prompts)
        for i, prompt in enumerate(ids):
            tokens = len(prompt)
            if tokens == 0:  # e.g. only characters the tokenizer drops
                raise APIError(400, f"prompt {i} has no tokens for this model's tokenizer")
            if tokens + max_tokens > engine.max_model_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                    f"requested {tokens + max_tokens} tokens ({tokens} in the prompt, {max_tokens} for the "
                    "completion). Please reduce the length of the prompt or max_tokens.",
                )
            engine.check_budget(tokens, params)
        return ids

    async def generate(prompts: list[Prompt], params: SamplingParams, stop) -> tuple[list[list[Completion]], int]:
        ids = check_prompts(prompts, params)
        stops = [stop] if isinstance(stop, str) else stop
        return await decode(ids, params, stops), sum(len(p) for p in ids)

    def respond(
        req: Sampling,
        kind: str,
        generated: tuple[list[list[Completion]], int],
        chat: bool,
        echo: list[str] | None = None,
    ):
        """The answer to ``req``; ``echo``: the prompts' texts, to come before their completions."""
        groups, prompt_tokens = generated
        top = 0 if chat else (req.logprobs or 0)  # the echoed prompt tokens' alternatives
        scored = req.prompt_logprobs is not None
        choices = [
            _choice(i * len(g) + j, c, chat, echo[i] if echo else None, top, scored and not chat)
            for i, g in enumerate(groups)
            for j, c in enumerate(g)
        ]
        body = response(kind, choices, groups, prompt_tokens, chat)
        if chat and scored:  # vLLM gives the chat prompt's log-probabilities beside the choices
            body["prompt_logprobs"] = _vllm_prompt_logprobs(groups[0][0].prompt_logprobs)
        if req.stream:
            return _sse(body, chat, bool((req.stream_options or {}).get("include_usage")))
        return body

    def response(
        kind: str, choices: list[dict], groups: list[list[Completion]], prompt_tokens: int, chat: bool
    ) -> dict:
        completion_tokens = sum(c.completion_tokens for g in groups for c in g)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": engine.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def _models():
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "rewardkit",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/chat/completions", responses=_or_stream(ChatCompletion))
    async def _chat(req: ChatRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true")
        params = sampling(req, default_max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        messages = [
            {"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in req.messages
        ]
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
        prompt = engine.render_chat(messages, None if thinking is None else bool(thinking))
        return respond(req, "chat.completion", await generate([prompt], params, req.stop), chat=True)

    @app.post("/v1/completions", responses=_or_stream(TextCompletion))
    async def _completions(req: CompletionRequest):
        params = sampling(req, 16, req.logprobs)  # 16: OpenAI's and vLLM's default for plain completions
        one = isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))
        prompts = [req.prompt] if one else req.prompt
        generated = await generate(prompts, params, req.stop)
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if req.echo else None
        return respond(req, "text_completion", generated, chat=False, echo=echo)

    app.state.generate = generate
    return app
