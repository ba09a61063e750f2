"""Top-p without a full sort of the vocabulary draws from the same distribution as the rules say.

The reference below follows token_sampling's docstring literally over the whole vocabulary: a
token survives top-p when the tokens strictly more likely than it total less than p (no sort, so
ties cannot depend on one). The sampler's distribution (its kept candidates' softmax, scattered back
over the vocabulary) must keep exactly the same tokens with the same probabilities.
"""

import pytest
import torch

from andy_dist.infer.token_sampling import SamplingConfig, next_token, top_k_top_p


def reference_probs(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) probabilities by the rules, over the whole vocabulary."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if top_k:
        ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        keep &= ranks < top_k
    if top_p < 1:
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).double()
        ascending = probs.sort(dim=-1).values
        tail = ascending.flip(-1).cumsum(-1).flip(-1)  # tail[:, j]: the mass of ascending[:, j:]
        tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=-1)
        above = tail.gather(-1, torch.searchsorted(ascending, probs, right=True))  # mass strictly above
        keep &= above < top_p
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def sampler_probs(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    kept, ids = top_k_top_p(scores, top_k, top_p)
    probs = torch.softmax(kept, dim=-1)
    return probs if ids is None else torch.zeros_like(scores).scatter(-1, ids, probs)


def assert_same_distribution(scores, top_k, top_p):
    ours, ref = sampler_probs(scores, top_k, top_p), reference_probs(scores, top_k, top_p)
    assert torch.equal(ours > 0, ref > 0), "a different set of tokens is kept"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat (nucleus of most of V) .. peaked (a few tokens)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (0, 0.99), (50, 0.9), (7, 0.3), (40, 1.0)])
def test_same_tokens_and_probabilities_as_the_whole_vocabulary(spread, top_k, top_p):
    scores = torch.randn(4, 3000, generator=torch.Generator().manual_seed(int(spread * 10) + top_k)) * spread
    assert_same_distribution(scores, top_k, top_p)


def test_rows_of_one_batch_with_small_and_large_nuclei():
    gen = torch.Generator().manual_seed(3)
    scores = torch.cat([torch.randn(2, 5000, generator=gen) * 10, torch.randn(2, 5000, generator=gen) * 0.1])
    assert_same_distribution(scores, 0, 0.9)


@pytest.mark.parametrize("spread,candidates", [(6.0, 256), (3.0, 4096), (0.5, 50_000)])
def test_candidates_grow_only_as_far_as_the_nucleus(spread, candidates):
    """Peaked: the first 256 hold the nucleus; a nucleus of ~2,000: 16x more; flat: a full sort."""
    scores = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(4)) * spread
    kept, ids = top_k_top_p(scores, 0, 0.9)
    assert ids.shape == (2, candidates)
    assert torch.isinf(kept[:, -1]).all() or candidates == 50_000
    assert_same_distribution(scores, 0, 0.9)


def test_tied_tokens_are_kept_or_dropped_together():
    # 0.25 x 3, 0.125 x 2 (exact in binary): with p = 0.3 the first 0.25 alone does not reach p, so
    # every token as likely as it is kept, whatever order a sort would have put them in.
    probs = torch.tensor([[0.125, 0.25, 0.125, 0.25, 0.25]])
    for top_p, kept in [(0.3, [1, 3, 4]), (0.75, [1, 3, 4]), (0.76, [0, 1, 2, 3, 4])]:
        ours = sampler_probs(probs.log(), 0, top_p)
        assert ours.nonzero()[:, 1].tolist() == kept
        assert_same_distribution(probs.log(), 0, top_p)
    flat = torch.zeros(1, 1000)  # a tie across the first candidates' edge: all 1000 are kept
    assert sampler_probs(flat, 0, 0.5).gt(0).sum().item() == 1000


def test_top_p_keeps_the_most_likely_token_even_below_p():
    scores = torch.randn(3, 800, generator=torch.Generator().manual_seed(5))
    ours = sampler_probs(scores, 0, 1e-9)
    assert torch.equal(ours.argmax(-1), scores.argmax(-1)) and (ours.gt(0).sum(-1) == 1).all()
    assert_same_distribution(scores, 0, 1e-9)


def previous_top_k_top_p(scores, top_k, top_p):
    """The sampler before the partial sort (with top-k, its path is unchanged)."""
    scores, ids = torch.topk(scores, top_k, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    return scores.masked_fill(drop, float("-inf")), ids


def test_top_k_with_top_p_draws_the_same_tokens_as_before_for_a_seed():
    """The case tools/generate.py's benchmark runs (top-k 50, top-p 0.9): same seed, same tokens."""
    scores = torch.randn(64, 2000, generator=torch.Generator().manual_seed(6)) * 3
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9)
    ours = next_token(scores, cfg, generator=torch.Generator().manual_seed(7))
    kept, ids = previous_top_k_top_p(scores / 0.8, 50, 0.9)
    choice = torch.multinomial(torch.softmax(kept, -1), 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, ids.gather(-1, choice).squeeze(-1))
