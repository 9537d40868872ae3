"""``service=llm_judge``: an OpenAI-compatible generation server over a Hugging Face causal LM.

Routes, as vLLM's OpenAI server answers them (the subset a judge needs):

* ``GET /v1/models``
* ``POST /v1/chat/completions`` ``{messages, n, temperature, top_p, max_tokens, stop, seed,
  chat_template_kwargs: {enable_thinking}}`` (no streaming)
* ``POST /v1/completions`` ``{prompt: str | [str], ...same sampling fields}``
* ``POST /judge`` ``{items: [{problem, reference, candidate}], prompt_template, ...}`` →
  ``{scores, replies}``: the judge itself, for callers that are not Python
* ``GET /health``, ``GET /metrics`` (shared kit)

Concurrent requests with equal sampling parameters share one ``generate`` call.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI
from hydra.utils import instantiate
from pydantic import BaseModel, Field, PositiveInt

from core.app import ServerSettings, add_batcher, check_batch_size, create_app
from core.errors import APIError
from core.generation import Completion, GenerationEngine, SamplingParams, apply_stop
from core.serving import serve
from judges.prompts import parse_reward, render, resolve_template


class TextPart(BaseModel):
    """A text part of a message's content list (images are not served here)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class Sampling(BaseModel):
    """Sampling fields shared by both generation routes."""

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatRequest(Sampling):
    """``/v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict | None = None


class CompletionRequest(Sampling):
    """``/v1/completions`` body."""

    prompt: str | list[str]


class JudgeItem(BaseModel):
    """One candidate to judge."""

    problem: str = ""
    reference: str
    candidate: str


class JudgeRequest(BaseModel):
    """``/judge`` body (seed 003's judge options)."""

    items: list[JudgeItem]
    prompt_template: str = "default"
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    max_new_tokens: PositiveInt = 512
    enable_thinking: bool = False


def _choice(index: int, c: Completion, chat: bool) -> dict:
    body = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_found, "logprobs": None}
    if chat:
        body["message"] = {"role": "assistant", "content": c.text}
    else:
        body["text"] = c.text
    return body


def judge_app(
    engine: GenerationEngine,
    settings: ServerSettings,
    max_batch_size: int = 32,
    max_wait_ms: float = 10.0,
    default_max_tokens: int = 512,
) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    app = create_app(
        "llm_judge",
        settings,
        metrics_namespace="generation",
        health=lambda: {"model": engine.name, "device": str(engine.device)},
    )
    batcher = add_batcher(app, lambda prompts, params: engine.complete(prompts, params), max_batch_size, max_wait_ms)

    def sampling(req: Sampling, default_tokens: int) -> SamplingParams:
        if req.stream:
            raise APIError(400, "stream=true is not supported by this server; send stream=false")
        if req.model is not None and req.model != engine.name:
            raise APIError(
                404, f"The model `{req.model}` does not exist; this server serves `{engine.name}`", "not_found"
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or default_tokens
        if max_tokens >= engine.max_model_len:
            raise APIError(400, f"max_tokens {max_tokens} must be below the model's context {engine.max_model_len}")
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens, seed=req.seed
        )

    async def generate(prompts: list[str], params: SamplingParams, stop) -> list[list[Completion]]:
        check_batch_size(len(prompts), settings, "prompt")
        stops = [stop] if isinstance(stop, str) else stop
        groups = await batcher.submit(prompts, key=params)
        return [[apply_stop(c, stops) for c in group] for group in groups]

    def response(kind: str, prompts: list[str], groups: list[list[Completion]], chat: bool) -> dict:
        choices = [_choice(i * len(g) + j, c, chat) for i, g in enumerate(groups) for j, c in enumerate(g)]
        prompt_tokens = sum(engine.count_tokens(p) for p in prompts)
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

    @app.get("/v1/models")
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

    @app.post("/v1/chat/completions")
    async def _chat(req: ChatRequest):
        params = sampling(req, default_max_tokens)
        messages = [
            {"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in req.messages
        ]
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
        prompt = engine.render_chat(messages, None if thinking is None else bool(thinking))
        groups = await generate([prompt], params, req.stop)
        return response("chat.completion", [prompt], groups, chat=True)

    @app.post("/v1/completions")
    async def _completions(req: CompletionRequest):
        params = sampling(req, 16)  # OpenAI's and vLLM's default for plain completions
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        groups = await generate(prompts, params, req.stop)
        return response("text_completion", prompts, groups, chat=False)

    @app.post("/judge")
    async def _judge(req: JudgeRequest):
        try:
            resolve_template(req.prompt_template)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        check_batch_size(len(req.items), settings, "items")
        params = SamplingParams(n=1, temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_new_tokens)
        prompts = [
            engine.render_chat(
                [{"role": "user", "content": render(req.prompt_template, it.problem, it.reference, it.candidate)}],
                req.enable_thinking,
            )
            for it in req.items
        ]
        replies = [g[0].text for g in await batcher.submit(prompts, key=params)]
        parsed = [parse_reward(r) for r in replies]
        return {
            "scores": [0.0 if p is None else p for p in parsed],
            "parsed": [p is not None for p in parsed],
            "replies": replies,
            "model": engine.name,
        }

    return app


def run(cfg) -> None:
    """Entry point of ``python run.py service=llm_judge``."""
    engine = instantiate(cfg.engine)
    settings = ServerSettings.from_config(cfg.server)
    serve(judge_app(engine, settings, default_max_tokens=cfg.generation.default_max_tokens, **cfg.batching), settings)
