"""The sort-free temperature + top-p sampler keeps exactly the tokens transformers' warpers keep,
and sampling through it follows the same distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from core.models.sampling import TemperatureTopP, nucleus_mask


def reference(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' own warpers: temperature, then top-p with a full sort."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    return warpers(None, scores.clone())


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.8), (0.7, 0.8), (1.3, 0.95), (0.5, 0.3), (1.0, 0.999)])
def test_keeps_exactly_the_tokens_a_full_sort_keeps(temperature, top_p):
    gen = torch.Generator().manual_seed(0)
    # peaked rows (a language model's usual shape) and flat ones (a nucleus of thousands of tokens)
    scores = torch.cat([torch.randn(64, 5000, generator=gen) * 6, torch.randn(64, 5000, generator=gen) * 0.5])
    ours = TemperatureTopP(temperature, top_p)(None, scores.clone())
    theirs = reference(scores, temperature, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(theirs)
    assert torch.allclose(ours[kept], theirs[kept])


def test_samples_follow_the_reference_distribution():
    # 40,000 draws through our processor against the reference nucleus probabilities: a chi-square
    # goodness-of-fit test at the 0.1% level (deterministic seed; a wrong mask or renormalisation
    # moves the statistic far past the bound).
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 200, generator=gen) * 2.5
    expected = torch.softmax(reference(scores, 0.8, 0.9), dim=-1)[0]
    probs = torch.softmax(TemperatureTopP(0.8, 0.9)(None, scores.clone()), dim=-1)[0]
    draws = torch.multinomial(probs, 40_000, replacement=True, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=200).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus, ever
    observed, wanted = counts[support], expected[support].double() * 40_000
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    dof = int(support.sum()) - 1
    bound = dof + 3.09 * (2 * dof) ** 0.5 + 10  # above the 99.9% quantile of chi-square(dof)
    assert chi2 < bound, (chi2, dof)


def test_nucleus_mask_keeps_at_least_the_most_likely_token():
    scores = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert nucleus_mask(scores, 0.01).tolist() == [[True, False, False], [True, False, False]]
    assert nucleus_mask(scores, 1.0)[1].all()
