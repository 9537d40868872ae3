"""``service=llm_judge``: the OpenAI-compatible generation server plus the judge itself.

``POST /judge`` ``{items: [{problem, reference, candidate}], mode, prompt_template, ...}`` →
``{scores, parsed, replies, model}``: the LLM judge for callers that are not Python, over the
same batched model calls as ``/v1/chat/completions`` (``core.models.generation_app``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, WithJsonSchema

from core.models.generation_app import generation_app
from core.models.generation_engine import GenerationEngine
from core.serving.app import ServerSettings, check_batch_size
from judges.prompts import TEMPLATES, judge_sampling, judge_score, render, resolve_template

TEMPLATE_SCHEMA = {
    "anyOf": [
        {"enum": list(TEMPLATES)},
        {"type": "string", "allOf": [{"pattern": r"\{CANDIDATE_SOLUTION\}"}, {"pattern": r"\{REFERENCE_SOLUTION\}"}]},
    ],
    "default": "default",
}


class JudgeItem(BaseModel):
    """One candidate to judge."""

    problem: str = ""
    reference: str
    candidate: str


class JudgeRequest(BaseModel):
    """``/judge`` body (the reference LLM judge's options)."""

    model_config = ConfigDict(strict=True)
    items: list[JudgeItem]
    # text (parse REWARD: x) | logprobs (p(yes) of a yes/no answer)
    mode: Literal["text", "logprobs"] = "text"
    # a template's name, or a template string holding both solution placeholders
    prompt_template: Annotated[str, WithJsonSchema(TEMPLATE_SCHEMA)] = "default"
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    # null: the server's default_max_tokens (512 as configured, the reference judge's default)
    max_new_tokens: PositiveInt | None = None
    enable_thinking: bool = False


class JudgeResponse(BaseModel):
    """``/judge`` answer: a score per item (0.0 when the reply had none: ``parsed`` is then false)."""

    scores: list[float]
    parsed: list[bool]
    replies: list[str]
    model: str


def judge_app(engine: GenerationEngine, settings: ServerSettings, **generation) -> FastAPI:
    """The generation server over ``engine`` (``generation``: ``generation_app``'s batching and
    ``default_max_tokens``) with ``POST /judge`` added."""
    app = generation_app(engine, settings, title="llm_judge", **generation)
    generate = app.state.generate

    @app.post("/judge", responses={200: {"model": JudgeResponse}})
    async def _judge(req: JudgeRequest):
        resolve_template(req.prompt_template)  # an unknown template name: ValueError, a 400
        check_batch_size(len(req.items), settings, "items")
        max_new_tokens = req.max_new_tokens or generation.get("default_max_tokens", 512)
        params = judge_sampling(req.mode, req.temperature, req.top_p, max_new_tokens)
        prompts = [
            engine.render_chat(
                [{"role": "user", "content": render(req.prompt_template, it.problem, it.reference, it.candidate)}],
                req.enable_thinking,
            )
            for it in req.items
        ]
        groups, _tokens = await generate(prompts, params, None)
        replies = [g[0] for g in groups]
        parsed = [judge_score(req.mode, r) for r in replies]
        return {
            "scores": [0.0 if p is None else p for p in parsed],
            "parsed": [p is not None for p in parsed],
            "replies": [r.text for r in replies],
            "model": engine.name,
        }

    return app
