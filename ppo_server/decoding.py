"""The policy server's three decoding strategies in one batched loop with a KV cache.

* ``temperature``: ``num_samples`` independent samples at the given temperature.
* ``beam_search``: one group of ``num_samples`` beams; the ``num_samples`` best are returned.
* ``diverse_beam_search``: ``num_samples`` groups of ``beams_per_group`` beams; at every step
  each group's candidates are penalised by ``diversity_penalty`` for each earlier group that
  chose the same token at this step (Hamming diversity, Vijayakumar et al. 2016); the best beam
  of each group is returned. transformers 5 removed group beam search from ``generate``, so
  the loop is ours; the other two strategies share it, so every strategy stops the same way.

A row stops at any of the model's end ids (the tokenizer's eos and every id of the generation
config's ``eos_token_id``; the end token is then reported as the stop string found) or as soon as
its generated text contains a stop string; many prompts are decoded together (one "generate
call" per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from core.models.generation import cut_at_stop
from core.models.loading import end_token_ids

STRATEGIES = ("temperature", "diverse_beam_search", "beam_search")
# Generated tokens decoded at each step to look for a stop string (longer strings are still
# found at the end, just one step later than they could be).
_STOP_TAIL_TOKENS = 16


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


def _clean(logits: torch.Tensor, safe: bool) -> torch.Tensor:
    if not safe:
        return logits
    finfo = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=0.0, posinf=finfo.max / 2, neginf=finfo.min / 2)


@torch.inference_mode()
def decode(model, tokenizer, prompts: Sequence[str], spec: DecodeSpec) -> list[list[Decoded]]:
    """``spec.num_samples`` sequences for each prompt, all prompts in one batched loop."""
    groups, beams = _shape(spec)
    width = groups * beams
    device = next(model.parameters()).device
    enc = tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=spec.max_input_length,
        add_special_tokens=False,
    ).to(device)
    n, prompt_len = enc["input_ids"].shape
    ids = enc["input_ids"].repeat_interleave(width, 0)
    mask = enc["attention_mask"].repeat_interleave(width, 0)
    # Only the first beam of each group is alive at the start, so beams do not begin as copies.
    scores = torch.zeros(n, groups, beams, device=device)
    scores[:, :, 1:] = float("-inf")
    done = torch.zeros(n * width, dtype=torch.bool, device=device)
    lengths = torch.zeros(n * width, dtype=torch.long, device=device)
    found: list[str | None] = [None] * (n * width)
    pad = tokenizer.pad_token_id
    ends = torch.tensor(end_token_ids(tokenizer, model.generation_config), device=device)
    cache, step_input = DynamicCache(), ids
    for _ in range(max(0, spec.max_output_length - prompt_len)):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1] :]
        out = model(
            input_ids=step_input, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        logits = _clean(out.logits[:, -1].float(), spec.safe_logits)
        if spec.decoding_strategy == "temperature":
            probs = torch.softmax(logits / max(spec.temperature, 1e-5), dim=-1)
            tokens = torch.multinomial(probs, 1).squeeze(1)
            tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
        else:
            order, tokens = _beam_step(scores, torch.log_softmax(logits, -1), done, pad, spec.diversity_penalty)
            ids, mask, done, lengths = ids[order], mask[order], done[order], lengths[order]
            found = [found[i] for i in order.tolist()]
            cache.reorder_cache(order)
        lengths += (~done).long()
        ids = torch.cat([ids, tokens[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tokens)[:, None]], 1)
        ended = torch.isin(tokens, ends) & ~done
        for row in ended.nonzero().flatten().tolist():
            found[row] = tokenizer.convert_ids_to_tokens(int(tokens[row]))
        done |= ended
        _mark_stops(tokenizer, ids[:, prompt_len:], lengths, done, found, spec.stop_strings)
        if bool(done.all()):
            break
        step_input = tokens[:, None]
    return _collect(tokenizer, ids[:, prompt_len:], lengths, found, scores, spec, n, groups, beams, ends.tolist())


def _beam_step(scores, logp, done, pad: int, penalty: float):
    """Advance every group's beams by one token in place; return (row order, chosen tokens)."""
    n, groups, beams = scores.shape
    vocab = logp.shape[-1]
    # A finished beam only continues with padding, at no cost, so its score is kept.
    finished = torch.full_like(logp, float("-inf"))
    finished[:, pad] = 0.0
    logp = torch.where(done[:, None], finished, logp).view(n, groups, beams, vocab)
    used = torch.zeros(n, vocab, device=logp.device)
    order = torch.empty(n, groups, beams, dtype=torch.long, device=logp.device)
    tokens = torch.empty_like(order)
    for g in range(groups):
        total = scores[:, g, :, None] + logp[:, g]
        # Diversity shapes the choice only; the kept score stays the sequence log-probability.
        chosen = (total - penalty * used[:, None, :]).view(n, -1).topk(beams, dim=-1).indices
        beam, token = chosen // vocab, chosen % vocab
        scores[:, g] = total.view(n, -1).gather(1, chosen)
        used.scatter_add_(1, token, torch.ones_like(token, dtype=used.dtype))
        order[:, g], tokens[:, g] = g * beams + beam, token
    rows = torch.arange(n, device=logp.device)[:, None] * groups * beams
    return (rows + order.view(n, -1)).view(-1), tokens.view(-1)


def _mark_stops(tokenizer, generated, lengths, done, found: list, stop_strings: Sequence[str]) -> None:
    if not stop_strings:
        return
    for row in (~done).nonzero().flatten().tolist():
        length = int(lengths[row])
        tail = tokenizer.decode(generated[row, max(0, length - _STOP_TAIL_TOKENS) : length], skip_special_tokens=False)
        _, stop = cut_at_stop(tail, stop_strings)
        if stop is not None:
            done[row], found[row] = True, stop


def _collect(tokenizer, generated, lengths, found, scores, spec, n, groups, beams, ends) -> list[list[Decoded]]:
    # Length-normalised scores rank the beams (length_penalty 1.0, as generate's default).
    norm = (scores.view(-1) / lengths.clamp(min=1)).view(n, groups, beams)
    out = []
    for p in range(n):
        if spec.decoding_strategy == "beam_search":
            picks = norm[p, 0].argsort(descending=True).tolist()
        else:  # sampling (one beam per group) or the best beam of each diverse group
            picks = [g * beams + int(norm[p, g].argmax()) for g in range(groups)]
        out.append([_decoded(tokenizer, generated, lengths, found, p * groups * beams + i, spec, ends) for i in picks])
    return out


def _decoded(tokenizer, generated, lengths, found, row: int, spec: DecodeSpec, ends: list[int]) -> Decoded:
    tokens = generated[row, : int(lengths[row])]
    text = tokenizer.decode(tokens, skip_special_tokens=spec.skip_special_tokens)
    # A stop string that is not a special token is still in the text: cut it off (it is reported).
    text, _ = cut_at_stop(text, spec.stop_strings)
    ended = len(tokens) > 0 and int(tokens[-1]) in ends
    return Decoded(text, found[row], ended)
