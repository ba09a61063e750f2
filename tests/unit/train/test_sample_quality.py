"""Sample quality figures (andy_dist.train.sample_quality) through the trainer's own sampler (TrainingSamples).

The figures on hand-made ids, then the test that matters: the same tiny model before and after training,
sampled from held-out paragraphs' first words, against what the held-out paragraphs themselves score.
"""

import math

import pytest
import torch

from andy_dist import EOS_ID
from andy_dist.train.sample_quality import distinct, mean_logprob, repeat_rate, summarize, text_figures
from andy_dist.train.samples import TrainingSamples
from andy_dist.train.settings import SampleSettings


def test_figures_on_known_ids():
    assert distinct([5, 6, 5, 6], 1) == 0.5 and distinct([5, 6, 5, 6], 2) == pytest.approx(2 / 3)
    assert distinct([5], 2) is None and repeat_rate([5, 6]) is None
    assert repeat_rate([5, 6, 7, 5, 6, 7, 5]) == pytest.approx(2 / 5)  # (5,6,7) (6,7,5) (7,5,6) then 2 repeats
    ended = text_figures([5, 6, 7, EOS_ID])
    assert ended == {"distinct_1": 1.0, "distinct_2": 1.0, "repeat_3gram": 0.0, "eos": 1.0, "length": 3.0}
    assert text_figures([5, 5, 5])["eos"] == 0.0 and text_figures([5, 5, 5])["length"] == 3.0
    rows = [{"logprob": -1.0, "eos": 1.0, "length": 4.0, "distinct_1": None},
            {"logprob": -3.0, "eos": 0.0, "length": 8.0, "distinct_1": 0.5}]
    summary = summarize(rows)
    assert summary["samples/logprob"] == -2.0 and summary["samples/eos_fraction"] == 0.5
    assert summary["samples/distinct_1"] == 0.5 and summary["samples/length"] == 6.0  # None is left out


def test_mean_logprob_is_the_models_own(trained_tiny):
    model = trained_tiny.model()
    prompt, completion = [2, 100, 200], [300, 400, EOS_ID]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    expected = sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)) / len(completion)
    assert mean_logprob(model, prompt, completion) == pytest.approx(expected, abs=1e-5)
    assert mean_logprob(model, prompt, []) is None


def test_figures_move_toward_real_text_as_the_model_trains(trained_tiny, tokenizer):
    """Untrained, the model writes noise to the length limit: low log-prob, never EOS, every bigram new, no
    3-gram repeated. Trained, every figure moves the way real text lies: its samples are likelier under it,
    end with EOS, and their distinct-1/2 and repeated-3-gram rates come closer to those of the held-out
    paragraphs themselves."""
    assert trained_tiny.losses[-1] < trained_tiny.losses[0] - 2.0
    held_out = trained_tiny.held_out[:24]
    prompts = [text.split()[0] + " " for text in held_out]
    settings = SampleSettings(prompts=tuple(prompts), max_new_tokens=48)
    sampler = TrainingSamples(settings, trained_tiny.cfg, tokenizer, torch.device("cpu"), seed=0)
    before = summarize(sampler(trained_tiny.untrained, step=1))
    after = summarize(sampler(trained_tiny.trained, step=1))
    real = []
    for text, prompt in zip(held_out, prompts):
        rest = tokenizer.encode(text, eos=True)[len(tokenizer.encode(prompt.strip())):]
        real.append(text_figures(rest[:settings.max_new_tokens]))
    real = summarize(real)
    assert after["samples/logprob"] > before["samples/logprob"] + 2.0
    assert before["samples/logprob"] < -math.log(tokenizer.vocab_size) + 1.0  # about uniform
    assert before["samples/eos_fraction"] == 0.0 and before["samples/length"] == settings.max_new_tokens
    assert after["samples/eos_fraction"] >= 0.5 and after["samples/length"] < settings.max_new_tokens
    for key in ("samples/distinct_1", "samples/distinct_2", "samples/repeat_3gram"):
        assert abs(after[key] - real[key]) < abs(before[key] - real[key]), (key, before[key], after[key], real[key])
