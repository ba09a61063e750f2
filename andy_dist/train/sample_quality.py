"""How good the training samples are, in numbers: one figure per quality the specification names.

    logprob       mean log-probability per generated token (EOS included) under the model that wrote
                  it, at temperature 1 without top-k/top-p: how sure the model is of its own text. It
                  rises as the model learns; a model that only repeats itself also scores high, hence:
    distinct_1/2  distinct unigrams / unigrams and distinct bigrams / bigrams of the completion
                  (EOS excluded): low means repetitive text; random tokens score near 1
    repeat_3gram  share of the completion's 3-grams that repeat an earlier 3-gram of it: the loops of a
                  half-trained model ("the the the", a line written over and over)
    eos           1.0 when the sample ended with EOS (the model learned where documents end), else 0.0
    length        generated tokens, EOS excluded

Each sample's row carries its figures (samples.jsonl, the W&B samples table); `summarize` gives the
mean over the prompts of a round, logged as `samples/*` (metrics.jsonl, W&B, the report). The text
figures are counted on token ids, so they compare between runs with the same tokenizer; computed on
held-out text (`text_figures`) they give the values a good model should approach.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from andy_dist import EOS_ID

REPEAT_N = 3
FIGURES = ("logprob", "distinct_1", "distinct_2", "repeat_3gram", "eos", "length")
# The metric each figure's mean over prompts is logged as (eos -> the fraction of samples that reached it).
METRIC_NAMES = {name: f"samples/{'eos_fraction' if name == 'eos' else name}" for name in FIGURES}


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(tokens: Sequence[int], n: int) -> Optional[float]:
    """Distinct n-grams / n-grams; None when the text has no n-gram."""
    grams = _ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else None


def repeat_rate(tokens: Sequence[int], n: int = REPEAT_N) -> Optional[float]:
    """Share of n-grams that already occurred earlier in the same text; None when it has no n-gram."""
    grams = _ngrams(tokens, n)
    if not grams:
        return None
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def text_figures(completion: Sequence[int], eos_id: int = EOS_ID) -> dict[str, Optional[float]]:
    """distinct_1, distinct_2, repeat_3gram, eos and length of generated ids (as `generate` returns them:
    a row that stopped at EOS ends with it)."""
    completion = list(completion)
    ended = bool(completion) and completion[-1] == eos_id
    text = completion[:-1] if ended else completion
    return {"distinct_1": distinct(text, 1), "distinct_2": distinct(text, 2), "repeat_3gram": repeat_rate(text),
            "eos": float(ended), "length": float(len(text))}


@torch.no_grad()
def mean_logprob(model, prompt: Sequence[int], completion: Sequence[int]) -> Optional[float]:
    """Mean log-probability of `completion` after `prompt` under `model` (one forward pass, temperature 1)."""
    if not completion:
        return None
    ids = (list(prompt) + list(completion))[-model.cfg.max_seq_len:]
    scored = min(len(completion), len(ids) - 1)  # a completion at the context limit loses its first token
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device)).logits[0, -scored - 1:-1].float()
    targets = torch.tensor(ids[-scored:], device=device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])
    return float(logprobs.mean())


def sample_figures(model, prompt: Sequence[int], completion: Sequence[int]) -> dict[str, Optional[float]]:
    """Every figure of one sample (the model in eval mode, as generation left it)."""
    return {"logprob": mean_logprob(model, prompt, completion), **text_figures(completion)}


def summarize(rows: list[dict]) -> dict[str, Optional[float]]:
    """samples/* metrics of one sampling round: each figure's mean over the rows that have it."""
    summary = {}
    for name in FIGURES:
        values = [row[name] for row in rows if isinstance(row.get(name), (int, float))]
        summary[METRIC_NAMES[name]] = sum(values) / len(values) if values else None
    return summary
