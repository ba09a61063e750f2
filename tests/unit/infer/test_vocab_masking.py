"""Generation never produces an id outside the tokenizer or past the vocabulary (issue 11, item 9).

Each model here is biased towards the ids that must not come out, so a test that lets one through fails.
"""

import pytest
import torch

from andy_dist import UserError
from andy_dist.config import ModelConfig
from andy_dist.infer.generate import generate, generate_text
from andy_dist.infer.token_sampling import SamplingConfig
from andy_dist.model import AndyLM
from andy_dist.train.samples import TrainingSamples
from andy_dist.train.settings import SampleSettings

SAMPLED = SamplingConfig(temperature=1.0)
SETTINGS = [SamplingConfig(temperature=0), SAMPLED, SamplingConfig(temperature=0.8, top_k=50, top_p=0.9),
            SamplingConfig(temperature=1.0, repetition_penalty=1.3)]
PROMPTS = [[2, 5, 6, 7], [2, 11]]


def model_preferring_ids_from(first: int, vocab: int, pad_multiple: int = 1, seed: int = 0) -> AndyLM:
    """A model whose head gives every id >= `first` (and every padded row) a far higher score than the rest."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_heads=2, n_layers=1, dropout=0.0)
    model = AndyLM(cfg.replace(vocab_pad_multiple=pad_multiple) if pad_multiple > 1 else cfg).eval()
    with torch.no_grad():
        model.ln_out.weight.zero_()
        model.ln_out.bias.fill_(1.0)  # every position's final hidden state is all ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[first:] = 1.0  # score 32 for those rows, 0 for the rest
    return model


@pytest.mark.parametrize("sampling", SETTINGS)
def test_no_id_at_or_past_valid_vocab_is_generated(sampling):
    model = model_preferring_ids_from(200, vocab=300)
    unmasked = generate(model, PROMPTS, 12, sampling, seed=0, eos_id=-1)
    assert any(t >= 200 for row in unmasked for t in row)  # what the model wants, without the mask
    masked = generate(model, PROMPTS, 12, sampling, seed=0, eos_id=-1, valid_vocab=200)
    assert all(len(row) == 12 and max(row) < 200 for row in masked), masked


@pytest.mark.parametrize("sampling", SETTINGS)
def test_padded_rows_are_never_generated(sampling):
    model = model_preferring_ids_from(300, vocab=300, pad_multiple=128)  # only the 84 padded rows score high
    assert model.lm_head.weight.shape[0] == 384
    out = generate(model, PROMPTS, 12, sampling, seed=0, eos_id=-1)
    assert all(len(row) == 12 and max(row) < 300 for row in out), out


def test_valid_vocab_larger_than_the_model_is_refused():
    with pytest.raises(UserError, match="valid_vocab=400 must be in 1..300"):
        generate(model_preferring_ids_from(200, vocab=300), PROMPTS, 4, valid_vocab=400)


def test_generate_text_with_a_model_vocabulary_larger_than_the_tokenizer(tokenizer):
    """A 2,000-piece tokenizer and a model of 2,500 ids that prefers the 500 the tokenizer lacks."""
    model = model_preferring_ids_from(tokenizer.vocab_size, vocab=tokenizer.vocab_size + 500)
    texts = generate_text(model, tokenizer, ["def main():", "import"], 16, SAMPLED, seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_training_samples_with_a_model_vocabulary_larger_than_the_tokenizer(tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size + 500, d_model=32, n_heads=2, n_layers=1, dropout=0.0)
    weights = model_preferring_ids_from(tokenizer.vocab_size, cfg.vocab_size).state_dict()
    samples = TrainingSamples(SampleSettings(prompts=("def ", "x = "), max_new_tokens=16, top_k=0, top_p=1.0),
                              cfg, tokenizer, torch.device("cpu"), seed=0)
    rows = samples(weights, step=3)
    assert [r["prompt"] for r in rows] == ["def ", "x = "] and all(r["completion"] for r in rows)
