"""Generation (LLM-judge) server benchmark, the variants side by side in this one run:

1. 32 concurrent judge-style chat requests, batched (up to 32 rows decoded together) vs one
   by one (``app.max_batch_size=1``), greedy and with the judge's sampling (T 0.7, top-p 0.8);
2. Poisson arrivals at 80 % of the whole-batch server's capacity, requests of mixed lengths
   (4 to 64 tokens): median and p90 latency of iteration-level scheduling (requests join the
   running batch between decode steps) vs whole-batch scheduling (``app.scheduling=batch``:
   concurrent requests decode together until the longest ends).

    python benchmarks/judge.py [--model tiny_lm|smollm2-135m] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from core.models.generation import SamplingParams  # noqa: E402
from core.models.generation_client import GenerationClient  # noqa: E402
from core.serving.local_server import LocalServer  # noqa: E402


def throughput(server: LocalServer, requests: int, params: SamplingParams) -> tuple[float, float]:
    """(requests/s, model calls) for ``requests`` concurrent judge-style chat requests."""
    client = GenerationClient(server.url, timeout=600, concurrency=requests)
    conversations = [
        [{"role": "user", "content": f"Grade candidate {i} against the reference."}] for i in range(requests)
    ]
    client.chat(conversations[:4], params)  # warm-up
    before = server.metric("generation_model_calls_total")
    started = time.perf_counter()
    client.chat(conversations, params)
    rate = requests / (time.perf_counter() - started)
    return rate, server.metric("generation_model_calls_total") - before


def poisson_latencies(url: str, rate: float, lengths: list[int], seed: int) -> list[float]:
    """Seconds from arrival to answer of requests arriving as a Poisson process at ``rate``/s."""
    gaps = random.Random(seed)

    async def run() -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:

            async def one(i: int, tokens: int) -> float:
                started = time.perf_counter()
                body = {"prompt": f"Grade answer {i}: the reference says", "max_tokens": tokens, "temperature": 0.0}
                reply = await http.post("/v1/completions", json=body)
                reply.raise_for_status()
                return time.perf_counter() - started

            tasks = []
            for i, tokens in enumerate(lengths):
                tasks.append(asyncio.create_task(one(i, tokens)))
                await asyncio.sleep(gaps.expovariate(rate))
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def poisson_rows(iteration: LocalServer, whole: LocalServer, requests: int) -> list[tuple[str, str, str, str]]:
    lengths = [random.Random(7 + i).choice((4, 8, 16, 32, 64)) for i in range(requests)]
    # capacity: the whole-batch server's request rate with every request in at once
    poisson_latencies(whole.url, 1e6, lengths[:8], 0)  # warm-up
    started = time.perf_counter()
    poisson_latencies(whole.url, 1e6, lengths, 1)
    capacity = requests / (time.perf_counter() - started)
    rate = 0.8 * capacity
    poisson_latencies(iteration.url, 1e6, lengths[:8], 0)  # warm-up
    a = sorted(poisson_latencies(iteration.url, rate, lengths, 2))
    b = sorted(poisson_latencies(whole.url, rate, lengths, 2))
    what = f"{requests} Poisson arrivals at {rate:.1f}/s (80% of {capacity:.1f}/s), 4-64 tokens"
    p90 = int(0.9 * (requests - 1))
    return [
        (
            f"{what}: p50 latency",
            f"{statistics.median(a):.2f} s",
            f"{statistics.median(b):.2f} s",
            f"{statistics.median(a) / statistics.median(b):.2f}x",
        ),
        (f"{what}: p90 latency", f"{a[p90]:.2f} s", f"{b[p90]:.2f} s", f"{a[p90] / b[p90]:.2f}x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_lm", help="a conf/model option: tiny_lm or smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--poisson-requests", type=int, default=64)
    args = parser.parse_args()
    served = ("service=llm_judge", f"model={args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        with (
            LocalServer(tmp, *served) as batched,
            LocalServer(tmp, *served, "app.max_batch_size=1") as single,
        ):
            for label, temperature in (("greedy", 0.0), ("T=0.7 top_p=0.8", 0.7)):
                params = SamplingParams(n=1, temperature=temperature, top_p=0.8, max_tokens=args.max_tokens)
                b_rate, b_calls = throughput(batched, args.requests, params)
                s_rate, s_calls = throughput(single, args.requests, params)
                what = f"{args.requests} concurrent requests, {args.max_tokens} tokens, {label}"
                rows.append((f"{what}: requests/s", f"{b_rate:.2f}/s", f"{s_rate:.2f}/s", f"{b_rate / s_rate:.1f}x"))
                rows.append(
                    (f"{what}: prefills", f"{b_calls:.0f}", f"{s_calls:.0f}", f"{s_calls / b_calls:.0f}x fewer")
                )
        report(f"Generation server ({args.model}): batched (A) vs one-by-one (B)", rows)
        with (
            LocalServer(tmp, *served) as iteration,
            LocalServer(tmp, *served, "app.scheduling=batch") as whole,
        ):
            rows = poisson_rows(iteration, whole, args.poisson_requests)
        report(f"Generation server ({args.model}): iteration-level (A) vs whole-batch (B) scheduling", rows)


if __name__ == "__main__":
    main()
