"""Temperature and nucleus (top-p) sampling without sorting the vocabulary.

Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``. The usual
implementation sorts every row's whole vocabulary at every step (49k entries for SmolLM2); the
nucleus is almost always a few dozen tokens, so ``nucleus_mask`` takes the top ``k`` (64 first,
four times more while some row's nucleus is not inside them) and finds each row's cut there.
It keeps exactly the tokens a full sort keeps (ties at the cut aside).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

FIRST_K = 64


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """A ``[rows, vocab]`` boolean mask of each row's nucleus: its most likely tokens, as few as
    reach ``top_p`` of the probability together (always at least one).

    >>> nucleus_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.8).tolist()
    [[True, True, False, False]]
    """
    probs = torch.softmax(logits.float(), dim=-1)
    # The running mass near top_p decides the cut: summed in float64, against the row's own total
    # (float32 probabilities do not sum to exactly 1), so rounding does not move it.
    target = top_p * probs.double().sum(dim=-1, keepdim=True)
    vocab = probs.shape[-1]
    k = min(FIRST_K, vocab)
    while True:
        values, indices = probs.topk(k, dim=-1)
        values = values.double()
        mass = values.cumsum(dim=-1)
        if k == vocab or bool((mass[:, -1:] >= target).all()):
            break
        k = min(k * 4, vocab)
    # a token is kept when the tokens before it do not reach top_p yet
    keep = (mass - values) < target
    keep[:, 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, indices, keep)


class TemperatureTopP(LogitsProcessor):
    """Temperature, then top-p, as ``generate``'s logits processor: ``scores / temperature`` with
    every token outside the nucleus at ``-inf``. Given to ``generate`` in place of its own
    temperature and top-p warpers (which sort the vocabulary)."""

    def __init__(self, temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.temperature, self.top_p = float(temperature), float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature
        if self.top_p >= 1.0:
            return scores
        return scores.masked_fill(~nucleus_mask(scores, self.top_p), float("-inf"))
