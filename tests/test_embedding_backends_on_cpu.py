"""The embedding engine's CPU backends (ONNX Runtime, its int8 variant, OpenVINO) against the torch
forward of the real MiniLM: same vectors, same reward ordering, exported once, served through the config."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.models.embedding_engine import EmbeddingEngine
from core.rewards.base import RewardSample
from core.serving.local_server import LocalServer
from judges.embedding_reward import EmbeddingSimilarityReward

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ROWS = [json.loads(line) for line in files("core").joinpath("data/sample_qa.jsonl").read_text().splitlines()]
# The bundled sample's completions and references, plus texts long enough to pad a batch unevenly.
REFERENCES = {
    ref for r in ROWS for ref in ([r["ground_truth"]] if isinstance(r["ground_truth"], str) else r["ground_truth"])
}
TEXTS = sorted({r["completion"] for r in ROWS} | REFERENCES) + [
    "word " * 300,
    "Ünïcödé, emoji 🙂 and punctuation!?",
]
MIN_COSINE = {"onnx": 0.999, "openvino": 0.999, "onnx-int8": 0.99}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def torch_vectors():
    return EmbeddingEngine({"name_or_path": MINILM}).embed(TEXTS)


def mean_by_kind(embedder) -> dict[str, float]:
    samples = [RewardSample(r["completion"], r["ground_truth"], r["prompt"]) for r in ROWS]
    scores = EmbeddingSimilarityReward(embedder)(samples)
    kinds = {r["kind"] for r in ROWS}
    return {k: np.mean([s for s, r in zip(scores, ROWS, strict=True) if r["kind"] == k]) for k in kinds}


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "openvino"])
def test_backend_vectors_match_torch_and_keep_the_reward_ordering(backend, cache, torch_vectors):
    engine = EmbeddingEngine({"name_or_path": MINILM, "cache_dir": cache}, backend=backend)
    vectors = engine.embed(TEXTS)
    cosines = (vectors * torch_vectors).sum(axis=1)  # both L2-normalised
    assert cosines.min() >= MIN_COSINE[backend], (backend, cosines.min())
    raw = engine.embed(TEXTS[:3], normalize=False, dimensions=100)
    assert raw.shape == (3, 100) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    kinds = mean_by_kind(engine)
    assert kinds["exact"] > kinds["paraphrase"] > kinds["unrelated"], kinds


def test_an_export_is_made_once_and_reused(cache):
    EmbeddingEngine({"name_or_path": MINILM, "cache_dir": cache}, backend="onnx")
    (export,) = [p for p in Path(cache, "exports").glob("*-onnx") if p.is_dir()]
    stamp = (export / "model.onnx").stat().st_mtime_ns
    EmbeddingEngine({"name_or_path": MINILM, "cache_dir": cache}, backend="openvino")  # the same ONNX file
    assert (export / "model.onnx").stat().st_mtime_ns == stamp and export.name.startswith("all-MiniLM-L6-v2-")
    assert not list(export.parent.glob("*.partial-*"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="embedding backend must be one of torch, onnx, onnx-int8, openvino"):
        EmbeddingEngine({"name_or_path": MINILM}, backend="tensorrt")


def test_the_service_serves_the_configured_backend(tmp_path, cache, torch_vectors):
    with LocalServer(tmp_path, "service=embedding", "engine.backend=openvino", f"+model.cache_dir={cache}") as server:
        info = httpx.get(f"{server.url}/info").json()
        vectors = np.array(httpx.post(f"{server.url}/embed", json={"inputs": TEXTS[:8]}).json())
    assert info["model_id"] == MINILM and info["dimension"] == 384
    assert (vectors * torch_vectors[:8]).sum(axis=1).min() >= 0.999
    assert list(Path(cache, "exports").glob("*-onnx/model.onnx"))
