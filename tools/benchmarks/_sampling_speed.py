"""The sampler per step: andy_dist's next_token against a full sort of the vocabulary (the baseline).

Scores are random normal logits over the medium vocabulary: a spread of 0.45 is what the random
medium model gives (flat: the top-p nucleus is most of V), 3.0 a nucleus of ~2,000 tokens, 6.0 a
peaked one of tens (a trained model's steps are mostly the last kind). Milliseconds per step, the
best of `repeats`, the same thread count as the rest of the section.
"""

from __future__ import annotations

import time

import torch

from andy_dist.infer.token_sampling import SamplingConfig, next_token


def _full_sort_top_p(scores: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """The baseline: sort all of V, keep the smallest prefix reaching top_p, draw."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    ordered = ordered.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))
    choice = torch.multinomial(torch.softmax(ordered, dim=-1), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 3)


def sampling_speed(vocab: int, batch_sizes: list[int], repeats: int = 30) -> dict:
    figures: dict = {"vocab": vocab, "unit": "ms per step (best of %d)" % repeats}
    top_p = SamplingConfig(top_p=0.9)
    for spread in (0.45, 3.0, 6.0):
        for batch in batch_sizes:
            gen = torch.Generator().manual_seed(0)
            scores = torch.randn(batch, vocab, generator=gen) * spread
            ours = _best_ms(lambda: next_token(scores, top_p, generator=gen), repeats)
            full = _best_ms(lambda: _full_sort_top_p(scores, 0.9, gen), repeats)
            figures[f"top_p_0.9_spread_{spread}_batch_{batch}"] = {"ours_ms": ours, "full_sort_ms": full,
                                                                    "speedup": round(full / ours, 2)}
    print(f"sampling: {figures}", flush=True)
    return figures
