"""The OpenAI server's prompt log-probabilities and structured outputs, on the real SmolLM2, each
comparison side by side in this one run:

1. lm-eval's loglikelihood requests (``echo``, ``logprobs: 1``, token-id prompts), sent by lm-eval's
   own ``local-completions`` model at ``num_concurrent`` 4 vs 1: requests/s (batching across requests);
2. a 512-token prompt scored (``max_tokens: 0``, ``prompt_logprobs``): served vs in process, and
   the number of model forwards it took;
3. JSON-schema constrained decoding vs free decoding of the same rows: generated tokens/s, and how
   many of 256 sampled constrained replies parse and satisfy the schema.

    python benchmarks/openai_extensions.py [--items 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, report  # noqa: E402
from core.models.constraints import response_format_key  # noqa: E402
from core.models.generation import SamplingParams  # noqa: E402
from core.models.generation_engine import GenerationEngine  # noqa: E402
from core.models.loading import SMOLLM2_ID, resolve_path  # noqa: E402
from core.serving.local_server import ROOT, LocalServer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "minLength": 20, "maxLength": 120},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def lm_eval_rate(url: str, items: int, concurrent: int) -> float:
    """Loglikelihood requests/s of lm-eval's ``local-completions`` model at ``num_concurrent``:
    its ``loglikelihood`` over ``items`` multiple-choice questions (4 requests each), timed alone
    (lm-eval's task set-up and tokenizer load would otherwise be counted as serving time)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{url}/v1/completions",
        model=SMOLLM2_ID,
        tokenizer_backend="huggingface",
        tokenizer=str(resolve_path(SMOLLM2_ID)),
        num_concurrent=concurrent,
    )
    requests = [
        Instance("loglikelihood", {}, (f"Question: What is {i} plus {i}?\nAnswer:", f" {choice}"), k)
        for i in range(items)
        for k, choice in enumerate((2 * i, 2 * i + 1, i, 3 * i))
    ]
    started = time.perf_counter()
    lm.loglikelihood(requests, disable_tqdm=True)
    return len(requests) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=24)
    args = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/smollm2-135m.yaml"), resolve=True)
    engine = GenerationEngine(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalServer(tmp, "service=llm_judge").start(timeout=300) as server:
        lm_eval_rate(server.url, 4, 1)  # warm-up
        one = lm_eval_rate(server.url, args.items, 1)
        four = lm_eval_rate(server.url, args.items, 4)
        rows.append(
            (
                f"lm-eval loglikelihood, {args.items * 4} requests: num_concurrent 4 / 1, req/s",
                f"{four:.1f}/s",
                f"{one:.1f}/s",
                f"{four / one:.2f}x",
            )
        )

        prompt = engine.token_ids([" ".join(f"word{i}" for i in range(400))])[0][:512]
        score = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)
        body = {"prompt": prompt, "max_tokens": 0, "prompt_logprobs": 0, "model": SMOLLM2_ID}
        with httpx.Client(timeout=120) as http:
            served = best_time(lambda: http.post(f"{server.url}/v1/completions", json=body).raise_for_status(), 3)
        before = engine.generate_calls
        local = best_time(lambda: engine.complete([prompt], score), 3)
        loops = engine.generate_calls - before
        rows.append(
            (
                f"{len(prompt)}-token prompt scored: served / in process time",
                f"{served * 1000:.0f} ms",
                f"{local * 1000:.0f} ms",
                f"{served / local:.2f}x",
            )
        )
        rows.append(("  decode loops per scoring call (one prefill forward each)", f"{loops / 4:.0f}", "", ""))

    key = response_format_key({"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}})
    chats = [[{"role": "user", "content": f"Question {i}: name a colour, and say why, as JSON."}] for i in range(32)]
    constrained = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=96, response_format=key, seed=1)
    free = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=96, seed=1)

    def rate(params, prompts):
        started = time.perf_counter()
        out = engine.chat(prompts, params)
        return sum(c.completion_tokens for g in out for c in g) / (time.perf_counter() - started)

    # 128 rows through a 32-row batch: rows join as others end, as under a server's steady load
    # (the JSON replies end sooner than free ones; a single batch left to drain would measure that)
    engine.max_batch_size = 8
    rate(constrained, chats[:8])  # warm-up (the tokenizer's grammar view is built once)
    for label, prompts in (("128 rows through 32 slots", chats), ("one batch of 32 rows, drained", chats[:8])):
        c_rate, f_rate = 0.0, 0.0
        for _ in range(2):
            c_rate = max(c_rate, rate(constrained, prompts))
            f_rate = max(f_rate, rate(free, prompts))
        rows.append(
            (
                f"decode, {label}: JSON-schema constrained / free, tokens/s",
                f"{c_rate:.0f}/s",
                f"{f_rate:.0f}/s",
                f"{c_rate / f_rate:.2f}x",
            )
        )
    # Room for the longest reply the schema allows: a 120-character answer can take 120 tokens.
    roomy = SamplingParams(**{**constrained.__dict__, "max_tokens": 256})
    valid, cut, total = 0, 0, 0
    for seed in range(2):  # 2 x 128 = 256 sampled replies
        for group in engine.chat(chats, SamplingParams(**{**roomy.__dict__, "seed": seed})):
            for reply in group:
                total += 1
                try:
                    jsonschema.validate(json.loads(reply.text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    cut += reply.finish_reason == "length"
    rows.append(
        (
            "constrained replies (max_tokens 256) that parse and satisfy the schema",
            f"{valid}/{total}",
            f"{cut} cut by max_tokens",
            f"{valid / total:.1%}",
        )
    )
    report("OpenAI server extensions (CPU, SmolLM2-135M-Instruct)", rows)


if __name__ == "__main__":
    main()
