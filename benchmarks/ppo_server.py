"""Policy server benchmark, both variants side by side against one ``service=policy`` process:
the same N tasks queued at once through ``POST /forward`` (the worker decodes them in batches)
and sent one by one through ``POST /direct_forward`` (one decode each), with the same sampling
settings; then the latency of ``GET /forward/<id>`` polls.

    python benchmarks/ppo_server.py [--tasks 32] [--max-output-length 48]
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

import httpx  # noqa: E402

from benchmarks.common import report  # noqa: E402
from core.serving.local_server import LocalServer  # noqa: E402
from ppo_server.clients import PolicyClient  # noqa: E402


def queued(client: PolicyClient, questions: list[str], poll_latencies: list[float]) -> float:
    """Seconds to queue every task, then poll each until done (polls timed into ``poll_latencies``)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        ids = list(pool.map(client.submit, questions))
    with httpx.Client(base_url=client.http.base_url) as http:
        for task_id in ids:
            while True:
                t = time.perf_counter()
                answer = http.get(f"/forward/{task_id}")
                poll_latencies.append(time.perf_counter() - t)
                if answer.status_code == 200:
                    break
                time.sleep(0.01)
    return time.perf_counter() - started


def direct(client: PolicyClient, questions: list[str], fields: dict) -> float:
    """Seconds for the same tasks through ``/direct_forward``, one at a time."""
    started = time.perf_counter()
    for question in questions:
        client.direct_forward(question, **fields)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2, help="sequences per task")
    parser.add_argument("--max-output-length", type=int, default=48)
    parser.add_argument("--model", default="tiny_lm", help="a conf/model option: tiny_lm or smollm2-135m")
    args = parser.parse_args()
    fields = {
        "num_samples": args.samples,
        "temperature": 0.7,
        "max_output_length": args.max_output_length,
        "stop_strings": ["<|eot_id|>", "<|eois_id|>"],
    }
    questions = [f"Task {i}: continue the reasoning step." for i in range(args.tasks)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(
            tmp,
            "service=policy",
            f"model={args.model}",
            f"policy.queue.num_samples={args.samples}",
            f"policy.queue.max_output_length={args.max_output_length}",
        ) as server,
    ):
        client = PolicyClient(server.url)
        queued(client, questions[:4], [])  # warm-up
        direct(client, questions[:2], fields)
        calls = server.metric("policy_model_calls_total")
        latencies: list[float] = []
        t_queued = queued(client, questions, latencies)
        calls = server.metric("policy_model_calls_total") - calls
        t_direct = direct(client, questions, fields)
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    report(
        f"policy server ({args.model}), {args.tasks} tasks x {args.samples} samples, "
        f"max_output_length {args.max_output_length}",
        [
            (
                "tasks/s: queued+batched vs direct one by one",
                f"{args.tasks / t_queued:.1f}",
                f"{args.tasks / t_direct:.1f}",
                f"{t_direct / t_queued:.2f}x",
            ),
            ("decode calls: queued vs direct", f"{calls:.0f}", f"{args.tasks}", f"{args.tasks / max(calls, 1):.1f}x"),
            ("GET /forward/<id> latency, ms: p50 vs p99", f"{p50:.1f}", f"{p99:.1f}", f"{p99 / p50:.1f}x"),
        ],
    )


if __name__ == "__main__":
    main()
