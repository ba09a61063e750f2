"""The sampler's rules one by one (andy_dist/infer/token_sampling.py's docstring gives the order)."""

import pytest
import torch

from andy_dist import PAD_ID, UserError
from andy_dist.infer.token_sampling import SamplingConfig, apply_repetition_penalty, next_token, top_k_top_p


def test_temperature_zero_is_greedy_and_uses_no_randomness():
    scores = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.9]])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert next_token(scores, SamplingConfig(temperature=0), generator=gen).tolist() == [1, 0]
    assert torch.equal(gen.get_state(), state)


def test_top_k_only_draws_from_the_k_best():
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.9, -2.0]]).repeat(400, 1)
    drawn = next_token(scores, SamplingConfig(temperature=5.0, top_k=2), generator=torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == {0, 1}


def test_top_p_keeps_at_least_the_most_likely_token():
    scores = torch.tensor([[1.0, 0.9, 0.8, 0.7]]).repeat(200, 1)  # the best has well under p = 1e-6
    drawn = next_token(scores, SamplingConfig(top_p=1e-6), generator=torch.Generator().manual_seed(2))
    assert set(drawn.tolist()) == {0}


def kept_ids(scores, top_k, top_p):
    kept, ids = top_k_top_p(scores, top_k, top_p)
    return sorted(ids[0][torch.isfinite(kept[0])].tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert kept_ids(probs.log(), 0, 0.8) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept_ids(probs.log(), 0, 0.81) == [0, 1, 3]
    kept, ids = top_k_top_p(probs.log(), 0, 1.0)
    assert ids is None and torch.equal(kept, probs.log())  # nothing filters: the scores as they were


def test_top_p_renormalises_after_top_k():
    # Whole vocabulary: 0.4, 0.3, 0.2, 0.1. top-k 2 leaves 0.4/0.7 = 0.571 and 0.429; with p = 0.55
    # the first alone reaches p, whereas on the full distribution the first two would be needed.
    logp = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    kept, ids = top_k_top_p(logp, 2, 0.55)
    assert ids.tolist() == [[0, 1]]
    assert torch.isfinite(kept).tolist() == [[True, False]]
    assert kept_ids(logp, 0, 0.55) == [0, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    scores = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    seen = torch.tensor([[1, 1, 2, 1, 2]])  # tokens 1 and 2, each seen more than once: penalised once
    assert apply_repetition_penalty(scores, seen, 2.0).tolist() == [[2.0, -4.0, 1.0, -2.0, 1.0]]
    assert apply_repetition_penalty(scores, seen, 1.0) is scores
    assert scores.tolist() == [[2.0, -2.0, 2.0, -2.0, 1.0]]  # the caller's scores are left alone


def test_repetition_penalty_changes_the_greedy_choice():
    scores = torch.tensor([[3.0, 2.0]])
    seen = torch.tensor([[0, 0]])  # token 0 is PAD: nothing seen
    assert next_token(scores, SamplingConfig(temperature=0, repetition_penalty=2.0), seen).item() == 0
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    seen = torch.tensor([[1, PAD_ID]])
    assert next_token(scores, SamplingConfig(temperature=0, repetition_penalty=2.0), seen).item() == 2
    assert next_token(scores, SamplingConfig(temperature=0, repetition_penalty=1.0), seen).item() == 1


def test_pad_is_never_counted_as_seen():
    scores = torch.tensor([[4.0, 3.0, -1.0, 2.0], [4.0, 3.0, -1.0, 2.0]])
    seen = torch.tensor([[PAD_ID, PAD_ID, 3], [1, 2, PAD_ID]])
    assert apply_repetition_penalty(scores, seen, 2.0).tolist() == [[4.0, 3.0, -1.0, 1.0], [4.0, 1.5, -2.0, 2.0]]


def test_seed_makes_draws_repeatable():
    scores = torch.randn(4, 50)
    cfg = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9)
    a = [next_token(scores, cfg, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    b = next_token(scores, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], a[1])
    assert not torch.equal(torch.stack([next_token(scores, cfg, generator=torch.Generator().manual_seed(s))
                                        for s in range(5)]), b.expand(5, -1))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0)])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError, match="--"):
        SamplingConfig(**kwargs)
