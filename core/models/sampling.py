"""Temperature and nucleus (top-p) sampling without sorting the vocabulary.

Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``. The usual
implementation sorts every row's whole vocabulary at every step (49k entries for SmolLM2) and
then draws from a 49k-way distribution; the nucleus of a trained model is almost always a few
dozen tokens. Here ``nucleus`` takes the top ``k`` candidates (64 first, eight times more while
some row's nucleus is not inside them; one sort of the vocabulary at once when the nucleus is
far outside them, as for a flat distribution) and finds each row's cut there, keeping exactly
the tokens a full sort keeps (ties at the cut aside). ``sample_nucleus`` draws among them by
inverting the cumulative distribution with one uniform number per row.
"""

from __future__ import annotations

import torch

FIRST_K = 64


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top candidates ``(probabilities, token ids, kept)``, most likely first, with
    ``kept`` marking the nucleus: as few tokens as reach ``top_p`` together (at least one)."""
    probs = torch.softmax(logits.float(), dim=-1)
    # The running mass near top_p decides the cut: summed in float64, against the row's own total
    # (float32 probabilities do not sum to exactly 1), so rounding does not move it.
    target = top_p * probs.double().sum(dim=-1, keepdim=True)
    vocab = probs.shape[-1]
    k = min(FIRST_K, vocab)
    while True:
        values, indices = probs.topk(k, dim=-1) if k < vocab else probs.sort(dim=-1, descending=True)
        mass = values.double().cumsum(dim=-1)
        if k == vocab or bool((mass[:, -1:] >= target).all()):
            break
        # a nucleus far outside the top k (a flat distribution) costs one sort, not many top-k's
        k = vocab if bool((mass[:, -1:] < target / 4).any()) else min(k * 8, vocab)
    # a token is kept when the tokens before it do not reach top_p yet
    kept = (mass - values.double()) < target
    kept[:, 0] = True
    return values, indices, kept


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """A ``[rows, vocab]`` boolean mask of each row's nucleus.

    >>> nucleus_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.8).tolist()
    [[True, True, False, False]]
    """
    _values, indices, kept = nucleus(logits, top_p)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, kept)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column index per row, drawn with probability proportional to the row's non-negative
    ``weights`` (the inverse of the cumulative distribution, one uniform number per row)."""
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64, device=weights.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=weights.shape[-1] - 1).squeeze(1)


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
