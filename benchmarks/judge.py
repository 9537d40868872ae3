"""LLM-judge server benchmark, both variants side by side in this one process:
the same concurrent chat requests against ``service=llm_judge`` with micro-batching on
(up to 32 prompts per generate call) and off (``app.max_batch_size=1``: one by one).

    python benchmarks/judge.py [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from core.models.generation import SamplingParams  # noqa: E402
from core.models.generation_client import GenerationClient  # noqa: E402
from core.serving.local_server import LocalServer  # noqa: E402


def throughput(server: LocalServer, requests: int, params: SamplingParams) -> tuple[float, float]:
    """(requests/s, generate calls) for ``requests`` concurrent judge-style chat requests."""
    client = GenerationClient(server.url, concurrency=requests)
    conversations = [
        [{"role": "user", "content": f"Grade candidate {i} against the reference."}] for i in range(requests)
    ]
    client.chat(conversations[:4], params)  # warm-up
    before = server.metric("generation_model_calls_total")
    started = time.perf_counter()
    client.chat(conversations, params)
    rate = requests / (time.perf_counter() - started)
    return rate, server.metric("generation_model_calls_total") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(tmp, "service=llm_judge", "model=tiny_lm") as batched,
        LocalServer(tmp, "service=llm_judge", "model=tiny_lm", "app.max_batch_size=1") as single,
    ):
        for label, temperature in (("greedy", 0.0), ("T=0.7 top_p=0.8", 0.7)):
            params = SamplingParams(n=1, temperature=temperature, top_p=0.8, max_tokens=args.max_tokens)
            b_rate, b_calls = throughput(batched, args.requests, params)
            s_rate, s_calls = throughput(single, args.requests, params)
            what = f"{args.requests} concurrent requests, {args.max_tokens} tokens, {label}"
            rows.append((f"{what}: requests/s", f"{b_rate:.1f}/s", f"{s_rate:.1f}/s", f"{b_rate / s_rate:.1f}x"))
            rows.append(
                (f"{what}: generate calls", f"{b_calls:.0f}", f"{s_calls:.0f}", f"{s_calls / b_calls:.0f}x fewer")
            )
    report("LLM judge server: micro-batched (A) vs one-by-one (B), tiny Qwen2 on CPU", rows)


if __name__ == "__main__":
    main()
