"""The policy server's three decoding strategies, run by the shared decode loop (``core.models.decoding``).

* ``temperature``: ``num_samples`` independent samples at the given temperature.
* ``beam_search``: one group of ``num_samples`` beams; the ``num_samples`` best are returned.
* ``diverse_beam_search``: ``num_samples`` groups of ``beams_per_group`` beams; at every step
  each group's candidates are penalised by ``diversity_penalty`` for each earlier group that
  chose the same token at this step (Hamming diversity, Vijayakumar et al. 2016); the best beam
  of each group is returned. transformers 5 removed group beam search from ``generate``; the
  decode loop has it, so every strategy stops the same way.

A row stops at any of the model's end ids (the tokenizer's eos and every id of the generation
config's ``eos_token_id``; the end token is then reported as the stop string found) or as soon as
its generated text contains a stop string; many prompts are decoded together (one "generate
call" per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.models.decoding import DecodeLoop, Row, RowSpec
from core.models.generation import cut_at_stop
from core.models.loading import end_token_ids

STRATEGIES = ("temperature", "diverse_beam_search", "beam_search")


@dataclass(frozen=True)
class DecodeSpec:
    """How to decode; requests with equal specs can share one batched call."""

    decoding_strategy: str = "temperature"
    num_samples: int = 1
    temperature: float = 0.7
    max_input_length: int = 1024
    # The whole sequence's token budget (prompt + generated), as ``generate(max_length=...)``.
    max_output_length: int = 1280
    stop_strings: tuple[str, ...] = ("<|eot_id|>", "<|eois_id|>")
    skip_special_tokens: bool = True
    # Replace NaN/inf logits before sampling instead of failing (a diverging model still answers).
    safe_logits: bool = False
    diversity_penalty: float = 1.0
    beams_per_group: int = 2


@dataclass
class Decoded:
    """One returned sequence."""

    text: str
    stop_string_found: str | None
    # True when the model ended the sequence itself (an end id), false otherwise.
    eos: bool


def _shape(spec: DecodeSpec) -> tuple[int, int]:
    """(groups, beams per group) for the strategy."""
    if spec.decoding_strategy == "temperature":
        return spec.num_samples, 1
    if spec.decoding_strategy == "beam_search":
        return 1, spec.num_samples
    if spec.decoding_strategy == "diverse_beam_search":
        return spec.num_samples, spec.beams_per_group
    raise ValueError(f"unknown decoding_strategy {spec.decoding_strategy!r}; use one of {', '.join(STRATEGIES)}")


def decode(model, tokenizer, prompts: Sequence[str], spec: DecodeSpec) -> list[list[Decoded]]:
    """``spec.num_samples`` sequences for each prompt, all prompts in one batched loop."""
    groups, beams = _shape(spec)
    ends = end_token_ids(tokenizer, model.generation_config)
    loop = DecodeLoop(model, tokenizer, ends, max_rows=len(prompts) * groups * beams, safe_logits=spec.safe_logits)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ids = [p[: spec.max_input_length] for p in ids]
    # A sampled row at temperature 0 is the greedy one; top-p 1.0 keeps the whole distribution.
    temperature = spec.temperature if spec.decoding_strategy == "temperature" else 0.0
    rows = [
        Row(prompt, RowSpec(max(0, spec.max_output_length - len(prompt)), temperature, 1.0, spec.stop_strings))
        for prompt in ids
    ]
    if spec.decoding_strategy == "temperature":
        samples = [row.copy() for row in rows for _ in range(groups)]
        loop.run([r for r in samples if r.spec.max_new_tokens > 0], what="decoding")
        return [
            [_decoded(tokenizer, r, spec) for r in samples[p * groups : (p + 1) * groups]] for p in range(len(rows))
        ]
    beamed = loop.beam_search(rows, groups, beams, spec.diversity_penalty)
    out = []
    for candidates in beamed:
        if spec.decoding_strategy == "beam_search":
            picks = sorted(candidates, key=lambda c: c[1], reverse=True)
        else:  # the best beam of each diverse group
            picks = [max(candidates[g * beams : (g + 1) * beams], key=lambda c: c[1]) for g in range(groups)]
        out.append([_decoded(tokenizer, row, spec) for row, _score in picks])
    return out


def _decoded(tokenizer, row: Row, spec: DecodeSpec) -> Decoded:
    text = tokenizer.decode(row.tokens, skip_special_tokens=spec.skip_special_tokens)
    # A stop string that is not a special token is still in the text: cut it off (it is reported).
    text, _ = cut_at_stop(text, spec.stop_strings)
    if row.finish == "end":
        return Decoded(text, tokenizer.convert_ids_to_tokens(row.tokens[-1]), True)
    return Decoded(text, row.stop_found, False)
