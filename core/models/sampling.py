"""Temperature and nucleus (top-p) sampling without sorting the vocabulary.

Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``. The usual
implementation sorts every row's whole vocabulary at every step (49k entries for SmolLM2) and
then draws from a 49k-way distribution; the nucleus of a trained model is almost always a few
dozen tokens. Here ``nucleus`` takes the top ``k`` candidates (64 first, eight times more while
some row's nucleus is not inside them) and finds each row's cut there; a row whose nucleus is far
outside them (a flat distribution, thousands of tokens) is cut by probability levels instead,
ranking only the tokens of the level where the cut falls. Both keep exactly the tokens a full
sort keeps (ties at the cut aside). ``sample_nucleus`` draws among them by
inverting the cumulative distribution (``draw``: a block of the vocabulary, then a token in it).
"""

from __future__ import annotations

import torch

FIRST_K = 64


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top candidates ``(probabilities, token ids, kept)``, most likely first, with
    ``kept`` marking the nucleus: as few tokens as reach ``top_p`` together (at least one)."""
    probs = torch.softmax(logits.float(), dim=-1)
    # The running mass near top_p decides the cut: summed in float64, against the row's own total
    # (float32 probabilities do not sum to exactly 1), so rounding does not move it. The total is
    # a float32 sum (torch sums in cascades; a float64 one converts the whole row first: 20x slower).
    target = top_p * probs.sum(dim=-1, keepdim=True).double()
    vocab = probs.shape[-1]
    k = min(FIRST_K, vocab)
    while True:
        values, indices = probs.topk(k, dim=-1)
        mass = values.double().cumsum(dim=-1)
        if bool((mass[:, -1:] >= target).all()):
            break
        if k * 8 >= vocab or bool((mass[:, -1:] < target / 4).any()):
            # a nucleus far outside the top k (a flat distribution): cut it by probability levels
            return _nucleus_by_levels(probs, target)
        k *= 8
    # a token is kept when the tokens before it do not reach top_p yet
    kept = (mass - values.double()) < target
    kept[:, 0] = True
    return values, indices, kept


# Probability levels of the flat-row cut: LEVELS_PER_OCTAVE per halving of the row's largest
# probability, LEVELS in all (the last one holds everything smaller).
LEVELS_PER_OCTAVE, LEVELS = 64, 4096


def _nucleus_by_levels(probs: torch.Tensor, target: torch.Tensor):
    """``nucleus`` for rows whose nucleus holds thousands of tokens, without sorting them: each
    token falls in a level by its probability (a level is a 1/64 octave), the levels' masses
    give the level where the running mass reaches ``target``, and only that level's tokens are
    ranked. Returns the whole vocabulary as candidates, in vocabulary order."""
    rows, vocab = probs.shape
    largest = probs.max(dim=-1, keepdim=True).values
    ratio = (largest / probs.clamp_min(torch.finfo(probs.dtype).tiny)).log2()
    level = (ratio * LEVELS_PER_OCTAVE).long().clamp_(max=LEVELS - 1)  # 0: the most likely tokens
    mass = torch.zeros(rows, LEVELS, dtype=probs.dtype, device=probs.device).scatter_add_(1, level, probs)
    running = mass.double().cumsum(dim=-1)
    reached = running >= target
    reached[:, -1] = True  # rounding may leave the total a hair under target
    cut = reached.int().argmax(dim=-1, keepdim=True)  # the level where the nucleus ends
    before = running.gather(1, cut) - mass.gather(1, cut).double()  # mass of the levels above it
    at_cut = level == cut
    count = int(at_cut.sum(dim=-1).max())
    values = torch.where(at_cut, probs, torch.zeros_like(probs)).topk(count, dim=-1).values
    # the cut level's tokens, most likely first, are kept while the mass before them is short of top_p
    short = (before + values.double().cumsum(dim=-1) - values.double()) < target
    smallest = torch.where(short, values, torch.full_like(values, float("inf"))).min(dim=-1, keepdim=True).values
    kept = (level < cut) | (at_cut & (probs >= smallest))
    kept |= probs == largest  # at least the most likely token
    indices = torch.arange(vocab, device=probs.device).expand(rows, vocab)
    return probs, indices, kept


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """A ``[rows, vocab]`` boolean mask of each row's nucleus.

    >>> nucleus_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.8).tolist()
    [[True, True, False, False]]
    """
    _values, indices, kept = nucleus(logits, top_p)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, kept)


# Columns per block of the two-level draw (a block, then a column inside it).
BLOCK = 256


def _invert(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the column where the cumulative ``weights`` first exceed ``u`` (in [0, 1)) of their total."""
    cdf = weights.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=weights.shape[-1] - 1).squeeze(1)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column index per row, drawn with probability proportional to the row's non-negative
    ``weights``: a block of ``BLOCK`` columns by its total, then a column inside it (two short
    cumulative sums instead of one over the whole vocabulary; the product of the two
    probabilities is the column's own)."""
    rows, columns = weights.shape
    u = torch.rand(rows, 2, 1, generator=generator, dtype=torch.float64, device=weights.device)
    if columns <= 4 * BLOCK:
        return _invert(weights, u[:, 0])
    weights = weights.contiguous()
    whole = columns // BLOCK
    # the whole blocks' totals through a strided view (no copy of the rows), then the last, short one
    blocks = weights.as_strided((rows, whole, BLOCK), (weights.stride(0), BLOCK, 1)).sum(dim=-1)
    if columns % BLOCK:
        blocks = torch.cat([blocks, weights[:, whole * BLOCK :].sum(dim=-1, keepdim=True)], dim=1)
    block = _invert(blocks, u[:, 0])
    # the chosen block's columns (past the last column: weight 0)
    at = block[:, None] * BLOCK + torch.arange(BLOCK, device=weights.device)
    inside = weights.gather(1, at.clamp(max=columns - 1)).masked_fill(at >= columns, 0.0)
    return block * BLOCK + _invert(inside, u[:, 1])


def sample_nucleus(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row, drawn from ``softmax(logits / temperature)`` cut to its nucleus,
    with ``generator`` (torch's global one by default, so ``torch.manual_seed`` makes it reproducible)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if top_p >= 1.0:  # no cut: the whole vocabulary, with no top-k at all
        return draw(torch.softmax(logits.float() / temperature, dim=-1), generator)
    values, indices, kept = nucleus(logits / temperature, float(top_p))
    chosen = draw(torch.where(kept, values, torch.zeros_like(values)), generator)
    return indices.gather(1, chosen[:, None]).squeeze(1)
