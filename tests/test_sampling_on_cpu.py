"""The sort-free sampler keeps exactly the tokens transformers' temperature and top-p warpers
keep, and its draws follow the same distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from core.models.sampling import nucleus_mask, sample_nucleus


def reference(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' own warpers: temperature, then top-p with a full sort."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    return warpers(None, scores.clone())


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.8), (0.7, 0.8), (1.3, 0.95), (0.5, 0.3), (1.0, 0.999)])
def test_keeps_exactly_the_tokens_a_full_sort_keeps(temperature, top_p):
    gen = torch.Generator().manual_seed(0)
    # peaked rows (a language model's usual shape) and flat ones (a nucleus of thousands of tokens)
    scores = torch.cat([torch.randn(64, 5000, generator=gen) * 6, torch.randn(64, 5000, generator=gen) * 0.5])
    ours = nucleus_mask(scores / temperature, top_p)
    assert torch.equal(ours, torch.isfinite(reference(scores, temperature, top_p)))


# 1.0: no nucleus, a draw over the whole vocabulary; 1,100 flat tokens: the draw goes block by
# block (the last one short) and 0.999 cuts the nucleus by probability levels
@pytest.mark.parametrize(
    ("top_p", "vocab", "scale"), [(0.9, 200, 2.5), (1.0, 200, 2.5), (1.0, 1100, 0.5), (0.999, 1100, 0.5)]
)
def test_draws_follow_the_reference_distribution(top_p, vocab, scale):
    # 40,000 independent draws (one per row of identical rows) against the reference nucleus
    # probabilities: a chi-square goodness-of-fit test at the 0.1% level (a wrong cut, a wrong
    # temperature or a biased draw moves the statistic far past the bound).
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(1, vocab, generator=gen) * scale
    expected = torch.softmax(reference(scores, 0.8, top_p), dim=-1)[0]
    torch.manual_seed(2)
    draws = sample_nucleus(scores.expand(40_000, -1), 0.8, top_p)
    counts = torch.bincount(draws, minlength=vocab).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus, ever
    observed, wanted = counts[support], expected[support].double() * 40_000
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    dof = int(support.sum()) - 1
    bound = dof + 3.09 * (2 * dof) ** 0.5 + 10  # above the 99.9% quantile of chi-square(dof)
    assert chi2 < bound, (chi2, dof)


def test_a_generator_reproduces_its_draws_and_they_stay_in_the_nucleus():
    scores = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3)) * 3
    first = sample_nucleus(scores, 0.7, 0.8, torch.Generator().manual_seed(5))
    torch.rand(100)  # the global generator moving does not matter
    again = sample_nucleus(scores, 0.7, 0.8, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert nucleus_mask(scores / 0.7, 0.8)[torch.arange(4), first].all()


def test_nucleus_keeps_at_least_the_most_likely_token():
    scores = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert nucleus_mask(scores, 0.01).tolist() == [[True, False, False], [True, False, False]]
    assert nucleus_mask(scores, 1.0)[1].all()
