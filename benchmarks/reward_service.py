"""Reward service benchmarks, each pair side by side in this one run, on the mix
exact match + embedding similarity (MiniLM) + LLM judge (SmolLM2-135M, logprobs mode):

1. many rollout workers: ``--clients`` threads, each sending one sample per request (OpenRLHF's
   pattern after each generation), against ``service=reward`` as configured (samples of
   concurrent requests merged) vs the same service scoring one request at a time
   (``app.max_batch_size=1``: what a plain FastAPI reward server such as OpenRLHF's ``serve_rm``
   does). Samples/s of each; goal ≥ 5×.
2. overhead of the service: one trainer's batch of ``--batch`` samples scored through
   ``service=reward`` (our client) vs the same mix in this process; median of ``--repeats``
   alternating rounds; goal ≤ 1.1×.

    python benchmarks/reward_service.py [--clients 32] [--requests 4] [--batch 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from core.rewards.base import RewardSample  # noqa: E402
from core.rewards.reward_client import RewardClient  # noqa: E402
from core.serving.local_server import ROOT, LocalServer  # noqa: E402

MIX = ["service=reward", "reward=default"]
REFERENCE = "Paris is the capital of France and its largest city."


def samples(n: int, tag: str) -> list[RewardSample]:
    """Distinct completions (no cache helps either side) of a capital-city question."""
    return [
        RewardSample(
            f"The capital of France is Paris ({tag} {i}), a city on the Seine.", REFERENCE, "Capital of France?"
        )
        for i in range(n)
    ]


def workers(url: str, clients: int, per_client: int, tag: str) -> float:
    """Samples/s of ``clients`` threads, each sending ``per_client`` single-sample requests."""
    client = RewardClient(url, timeout=600)
    client.score(samples(2, f"warm {tag}"))

    def one(k: int) -> None:
        for j, sample in enumerate(samples(per_client, f"{tag} {k}")):
            assert client.score([sample]).total[0] is not None, (k, j)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return clients * per_client / (time.perf_counter() - started)


def overhead(url: str, batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one batch through the service and in this process, alternating rounds."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        mix = instantiate(compose("config", overrides=["reward=default", "paths.output_dir=/tmp"]).reward)
    client = RewardClient(url, timeout=600)
    served, local = [], []
    for r in range(repeats + 1):
        batch_samples = samples(batch, f"round {r}")  # fresh texts: the embedding cache helps neither
        started = time.perf_counter()
        client.score(batch_samples)
        served.append(time.perf_counter() - started)
        batch_samples = samples(batch, f"round {r} again")
        started = time.perf_counter()
        mix.score(batch_samples)
        local.append(time.perf_counter() - started)
    return statistics.median(served[1:]), statistics.median(local[1:])  # round 0 warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="single-sample requests per client")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with LocalServer(tmp, *MIX) as merged:
            batched = workers(merged.url, args.clients, args.requests, "merged")
            calls = merged.metric("reward_model_calls_total")
            items = merged.metric("reward_model_items_total")
            served_s, local_s = overhead(merged.url, args.batch, args.repeats)
        with LocalServer(tmp, *MIX, "app.max_batch_size=1") as single:
            one_by_one = workers(single.url, args.clients, args.requests, "single")
    rows.append(
        (
            f"{args.clients} workers x 1 sample/request: merged vs one request at a time (samples/s)",
            f"{batched:.1f}",
            f"{one_by_one:.1f}",
            f"{batched / one_by_one:.2f}x (goal >= 5x); {items / calls:.1f} samples per call",
        )
    )
    rows.append(
        (
            f"one batch of {args.batch}: through service=reward vs in process (s, median)",
            f"{served_s:.3f}",
            f"{local_s:.3f}",
            f"{served_s / local_s:.2f}x (goal <= 1.1x)",
        )
    )
    report("Reward service: exact match + embedding (MiniLM) + judge (SmolLM2, logprobs)", rows)


if __name__ == "__main__":
    main()
