"""InfoGain service benchmark, both variants side by side in this one process:
16 concurrent clients, each posting one item at a time, against ``service=infogain`` with
micro-batching (items of concurrent requests share generate calls) and without it
(``app.max_batch_size=1``: one item per compute). Also, in-process: entailment pairs the
engine checks (deduplicated, representatives only) against the naive all-pairs count, on
samples repeating the way short answers of a real model do (a generator plug-in draws them),
and on the served generator's own samples; and the generator's decode-step cost per row and
token at 1 to 320 rows, which bounds what merging items can gain on this machine.

    python benchmarks/infogain.py [--clients 16] [--items 48] [--model tiny_lm|smollm2-135m]
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

from benchmarks.common import report  # noqa: E402
from core.serving.local_server import LocalServer  # noqa: E402

COMMON = ["ig.num_generations=10", "ig.max_new_tokens=16", "server.max_concurrency=16", "logger=none"]
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Egypt": "Cairo",
    "Chile": "Santiago",
}


def make_items(n: int) -> list[dict]:
    pairs = list(CAPITALS.items())
    return [
        {
            "question": f"What is the capital of {c}?",
            "context": f"{a} is the capital of {c}. " * (1 + i % 3),
            "answers": [a],
        }
        for i, (c, a) in enumerate(pairs[i % len(pairs)] for i in range(n))
    ]


class RepeatingAnswers:
    """Generator plug-in: 10 samples per prompt drawn like a real model's short answers."""

    def complete(self, prompts, params, stop=None):
        from core.models.generation import Completion

        pool = ["Paris", "Paris", "Paris", "paris", "Paris.", "Lyon", "Paris", "Marseille", "Paris", "Lyon"]
        return [
            [Completion(pool[(j + i) % len(pool)], "stop", 2, None, -0.5 - 0.1 * j) for j in range(params.n)]
            for i, _ in enumerate(prompts)
        ]


def pairs_checked(items: list[dict]) -> tuple[int, int]:
    """(pairs the engine checked, naive count) with MiniLM entailment and repeating samples."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from core.serving.local_server import ROOT
    from infogain.engine import InfoGainEngine

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[])
    engine = InfoGainEngine(RepeatingAnswers(), instantiate(cfg.ig.entailment), num_generations=10)
    results = engine.compute(items)
    return (
        sum(r["details"]["entailment_pairs_checked"] for r in results),
        sum(r["details"]["entailment_pairs_naive"] for r in results),
    )


def step_costs(model: str, rows_list=(1, 20, 80, 320), steps: int = 6) -> list[tuple[int, float]]:
    """(rows, ms per row and token) of the generator's decode loop: where batching stops paying
    on this machine (one InfoGain item is 10 samples x 2 conditions = 20 rows)."""
    from collections import deque

    from omegaconf import OmegaConf

    from core.models.decoding import Row, RowSpec
    from core.models.generation_engine import GenerationEngine
    from core.serving.local_server import ROOT

    engine = GenerationEngine(OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/model/{model}.yaml"), resolve=True))
    prompt = engine.token_ids([make_items(1)[0]["context"] + " Question: what is the capital? Answer:"])[0]
    out = []
    for rows in rows_list:
        loop = engine.decode_loop(rows)
        waiting = deque(Row(prompt, RowSpec(steps + 1, temperature=1.0)) for _ in range(rows))
        loop.step(waiting)  # the prefill
        started = time.perf_counter()
        for _ in range(steps):
            loop.step(waiting)
        out.append((rows, (time.perf_counter() - started) / steps / rows * 1000))
    return out


def throughput(url: str, items: list[dict], clients: int) -> tuple[float, list[dict]]:
    """Items/s when ``clients`` threads post the items one per request."""
    with httpx.Client(timeout=600) as http:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            bodies = list(
                pool.map(lambda it: http.post(f"{url}/compute_info_gain", json={"items": [it]}).json(), items)
            )
        return len(items) / (time.perf_counter() - started), bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--model", default="tiny_lm", help="the generator: a conf/model option (tiny_lm, smollm2-135m)")
    args = parser.parse_args()
    items = make_items(args.items)
    served = ("service=infogain", f"model={args.model}", *COMMON)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(tmp, *served) as batched,
        LocalServer(tmp, *served, "app.max_batch_size=1") as single,
    ):
        throughput(batched.url, items[:4], 4)  # warm-up
        throughput(single.url, items[:4], 4)
        b_rate, bodies = throughput(batched.url, items, args.clients)
        s_rate, _ = throughput(single.url, items, args.clients)
        b_calls, s_calls = batched.metric("infogain_model_calls_total"), single.metric("infogain_model_calls_total")
    checked = sum(b["details"][0]["entailment_pairs_checked"] for b in bodies)
    naive = sum(b["details"][0]["entailment_pairs_naive"] for b in bodies)
    real_checked, real_naive = pairs_checked(items)
    costs = step_costs(args.model)
    report(
        f"{args.model} decode step, ms per row and token, by rows in the batch",
        [(f"{rows} rows", f"{ms:.1f} ms", "", f"{costs[0][1] / ms:.1f}x cheaper than 1 row") for rows, ms in costs],
    )
    report(
        f"InfoGain service ({args.model} generator): micro-batched (A) vs one item per compute (B), CPU",
        [
            (
                f"{args.clients} concurrent clients, {args.items} items, 10 samples x 2 conditions: items/s",
                f"{b_rate:.2f}/s",
                f"{s_rate:.2f}/s",
                f"{b_rate / s_rate:.1f}x",
            ),
            ("engine computes (incl. warm-up)", f"{b_calls:.0f}", f"{s_calls:.0f}", f"{s_calls / b_calls:.1f}x fewer"),
            (
                f"entailment pairs, {args.model} samples: engine vs naive",
                f"{checked}",
                f"{naive}",
                f"{naive / max(checked, 1):.1f}x fewer",
            ),
            (
                "entailment pairs, repeating short answers + MiniLM: engine vs naive",
                f"{real_checked}",
                f"{real_naive}",
                f"{real_naive / max(real_checked, 1):.1f}x fewer",
            ),
        ],
    )


if __name__ == "__main__":
    main()
