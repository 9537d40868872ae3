"""``service=embedding``: a TEI-compatible (and OpenAI-compatible) embedding server.

Routes, as Hugging Face Text Embeddings Inference answers them:

* ``POST /embed`` (and ``POST /``, as TEI) ``{inputs: str | [str] | token ids, normalize=true, truncate=false,
  truncation_direction, dimensions}`` → ``[[float, ...], ...]``; ``normalize=false`` gives the
  pooled vectors as the model computes them
* ``GET /v1/models`` → the one served model (any ``model`` name reaches it, as TEI)
* ``GET /info`` → model facts (``model_id``, ``max_input_length``, ``max_client_batch_size`` …)
* ``POST /v1/embeddings`` (OpenAI) ``{input, model, encoding_format: float|base64, dimensions}``, up to
  2,048 inputs (OpenAI's limit; ``app.openai_max_inputs``)
* ``GET /health``, ``GET /metrics`` (shared kit)

Concurrent requests are merged into one forward pass by the micro-batcher.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Literal

import numpy as np
import orjson
from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, PositiveInt, StrictBool

from core.models.embedding_engine import EmbeddingEngine, InputTooLong, finish_vectors
from core.serving.app import ServerSettings, add_batcher, check_batch_size, create_app
from core.serving.errors import APIError
from core.serving.schemas import ModelList

log = logging.getLogger(__name__)


def _json(content) -> Response:
    """JSON with numpy arrays serialised natively (FastAPI's encoder walks every float: ~50x slower)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class EmbedRequest(BaseModel):
    """TEI's ``/embed`` body."""

    model_config = ConfigDict(strict=True)
    inputs: str | list[str] | list[int] | list[list[int]]
    normalize: StrictBool = True
    truncate: StrictBool = False
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None
    dimensions: PositiveInt | None = None


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's ``/v1/embeddings`` body."""

    model_config = ConfigDict(strict=True)
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


class EmbeddingInfo(BaseModel):
    """``GET /info`` (TEI's fields that apply here)."""

    model_config = ConfigDict(extra="allow")
    model_id: str
    max_input_length: int
    max_client_batch_size: int
    max_concurrent_requests: int


class Embedding(BaseModel):
    """One vector of ``/v1/embeddings``: floats, or base64 of little-endian float32."""

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens read."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings``."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def embedding_app(
    engine: EmbeddingEngine,
    settings: ServerSettings,
    max_batch_size: int = 64,
    max_wait_ms: float = 5.0,
    openai_max_inputs: int = 2048,
) -> FastAPI:
    """The FastAPI app serving ``engine``. TEI's routes take at most ``server.max_batch_items`` inputs
    a request (TEI's ``max_client_batch_size``); OpenAI's ``/v1/embeddings`` takes ``openai_max_inputs``
    (OpenAI's own limit, 2,048), embedded ``max_batch_items`` at a time, since OpenAI clients send up
    to that many (LangChain's ``OpenAIEmbeddings`` 1,000)."""
    app = create_app(
        "embedding",
        settings,
        metrics_namespace="embedding",
        health=lambda: {"model": engine.name, "device": str(engine.device)},
    )

    def run_batch(texts: list[str], key: tuple[str, str | None]) -> list[np.ndarray]:
        direction, prompt_name = key
        return list(
            engine.embed(texts, normalize=False, truncate=True, truncation_direction=direction, prompt_name=prompt_name)
        )

    batcher = add_batcher(app, run_batch, max_batch_size, max_wait_ms)

    async def embed(
        texts: list[str],
        normalize: bool,
        truncate: bool,
        direction: str,
        dimensions: int | None,
        prompt_name: str | None,
    ) -> np.ndarray:
        check_batch_size(len(texts), settings, "inputs")
        return await embed_checked(texts, normalize, truncate, direction, dimensions, prompt_name)

    async def embed_checked(texts, normalize, truncate, direction, dimensions, prompt_name) -> np.ndarray:
        if prompt_name is not None and prompt_name not in engine.prompts:
            raise APIError(
                422,
                f"prompt_name {prompt_name!r} is not defined for model {engine.name} "
                f"(it defines {sorted(engine.prompts) or 'none'})",
            )
        if dimensions is not None and dimensions > engine.dimension:
            raise APIError(422, f"dimensions {dimensions} > model dimension {engine.dimension}")
        if not truncate:
            try:
                engine.check_lengths(texts)
            except InputTooLong as exc:
                raise APIError(413, str(exc), "validation") from None
        vectors = await batcher.submit(texts, key=(direction.lower(), prompt_name))
        return finish_vectors(np.stack(vectors), normalize, dimensions)

    # TEI also serves its model's route at "/" (huggingface_hub's InferenceClient posts there).
    vectors = {200: {"model": list[list[float]]}}

    @app.post("/", responses=vectors)
    @app.post("/embed", responses=vectors)
    async def _embed(req: EmbedRequest):
        texts = engine.texts_of(req.inputs)
        vectors = await embed(
            texts, req.normalize, req.truncate, req.truncation_direction, req.dimensions, req.prompt_name
        )
        return _json(vectors)

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def _models():
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "rewardkit"}],
        }

    @app.get("/info", responses={200: {"model": EmbeddingInfo}})
    async def _info():
        return {
            **engine.info(),
            "max_client_batch_size": settings.max_batch_items,
            "max_concurrent_requests": settings.max_concurrency,
        }

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingList}})
    async def _openai_embeddings(req: OpenAIEmbeddingRequest):
        # The one served model answers whatever `model` names, as TEI does.
        texts = engine.texts_of(req.input)
        check_batch_size(len(texts), settings, "input", limit=openai_max_inputs)
        # Parts of max_batch_items, submitted together: the batcher merges them into model calls
        # of at most its max_batch_size texts, the same memory bound as any other requests.
        parts = [texts[i : i + settings.max_batch_items] for i in range(0, len(texts), settings.max_batch_items)]
        done = await asyncio.gather(*(embed_checked(p, True, True, "right", req.dimensions, None) for p in parts))
        vectors = np.concatenate(done)
        data = []
        for i, vec in enumerate(vectors):
            value = base64.b64encode(vec.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(engine.count_tokens(texts))
        return _json(
            {
                "object": "list",
                "data": data,
                "model": engine.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return app
