"""One sampling step (temperature, top-p, the draw), both variants side by side in this one
process: transformers' (warpers that sort the whole vocabulary, then a draw over all of it, as
``generate(do_sample=True)`` does) against ``core.models.sampling.sample_nucleus``, what the
decode loop runs (top-k candidates widened only when a row's nucleus needs it, one sort for a
flat row, the draw by inverting the cumulative distribution), on SmolLM2-sized rows
(32 × 49,152): the logits of the real SmolLM2-135M-Instruct, and synthetic ones.

    python benchmarks/sampler.py [--rows 32] [--top-p 0.8] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, report  # noqa: E402
from core.models.sampling import nucleus_mask, sample_nucleus  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "Q: What is 7 times 8?\nA:",
    "Once upon a time",
]


def smollm2_logits(rows: int) -> torch.Tensor:
    """Next-token logits of the packaged SmolLM2 at the end of a few prompts and some steps into
    their continuations (the distributions a judge or InfoGain actually samples from)."""
    from omegaconf import OmegaConf

    from core.models.loading import build_causal_lm, device_for, load_tokenizer

    model_file = Path(__file__).resolve().parents[1] / "conf/model/smollm2-135m.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(model_file), resolve=True)
    tokenizer = load_tokenizer(cfg)
    model = build_causal_lm(cfg, tokenizer, device_for(0))
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            generated = model.generate(ids, max_new_tokens=rows // len(PROMPTS), do_sample=False)
            out.append(model(generated).logits[0, -(rows // len(PROMPTS)) :].float())
    return torch.cat(out)[:rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    reference = LogitsProcessorList([TemperatureLogitsWarper(args.temperature), TopPLogitsWarper(args.top_p)])
    gen = torch.Generator().manual_seed(0)
    cases = {
        "SmolLM2 logits": smollm2_logits(args.rows),
        "synthetic, peaked": torch.randn(args.rows, 49152, generator=gen) * 4,
        "synthetic, flat": torch.randn(args.rows, 49152, generator=gen),
    }
    rows = []
    for name, logits in cases.items():
        kept = int(torch.isfinite(reference(None, logits.clone())).sum()) / len(logits)
        same = torch.equal(
            nucleus_mask(logits / args.temperature, args.top_p), torch.isfinite(reference(None, logits.clone()))
        )
        a = best_time(lambda logits=logits: torch.multinomial(torch.softmax(reference(None, logits), -1), 1), 20)
        b = best_time(lambda logits=logits: sample_nucleus(logits, args.temperature, args.top_p), 20)
        rows.append(
            (
                f"{name}: {len(logits)} x {logits.shape[1]}, nucleus {kept:.0f} tokens/row, same tokens: {same}",
                f"{a * 1000:.1f} ms",
                f"{b * 1000:.1f} ms",
                f"{a / b:.1f}x faster",
            )
        )
    # No cut (top-p 1.0, InfoGain's sampling): a draw over the whole vocabulary either way.
    flat = cases["synthetic, flat"]
    plain = LogitsProcessorList([TemperatureLogitsWarper(args.temperature)])
    a = best_time(lambda: torch.multinomial(torch.softmax(plain(None, flat.clone()), -1), 1), 20)
    b = best_time(lambda: sample_nucleus(flat, args.temperature, 1.0), 20)
    rows.append(
        (
            f"top-p 1.0 (no cut), flat: {len(flat)} x {flat.shape[1]}",
            f"{a * 1000:.1f} ms",
            f"{b * 1000:.1f} ms",
            f"{a / b:.1f}x faster",
        )
    )
    report(f"one sampling step (temperature {args.temperature}, top-p {args.top_p}): transformers vs ours", rows)


if __name__ == "__main__":
    main()
