"""Loss, perplexity and bits per byte of one model or an ensemble on held-out batches.

An ensemble's figures are those of its averaged distribution, p(y) = mean over members of p_i(y): a proper
distribution, so its perplexity is comparable with each member's (the generator's mean of log-probabilities
is not normalised and only ranks tokens). Every member sees the same batches in one pass.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def figures(loss_sum: float, count: int, text_bytes: int) -> dict:
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss_sum / math.log(2) / max(text_bytes, 1),
            "target_tokens": count, "text_bytes": text_bytes}


@torch.inference_mode()
def evaluate_models(models: Sequence, batches: Iterable, text_bytes: int) -> dict:
    """{"members": [figures per model], "ensemble": figures of the averaged distribution, or None for one model}
    over (input_ids, targets, attention_mask) batches (targets PAD where no loss is wanted)."""
    from tqdm import tqdm

    from andy_dist import PAD_ID

    device = models[0].embed.weight.device
    member_sums, ensemble_sum, count = [0.0] * len(models), 0.0, 0
    for input_ids, targets, mask in tqdm(batches, desc="evaluate", unit="batch", mininterval=1.0):
        input_ids, targets, mask = input_ids.to(device), targets.to(device), mask.to(device)
        token_logprobs = []
        real = targets != PAD_ID
        for i, model in enumerate(models):
            if len(models) == 1:  # the model's own loss path (chunked: no full logits)
                member_sums[i] += float(model(input_ids, targets=targets, attention_mask=mask).loss_sum)
                continue
            logits = model(input_ids, attention_mask=mask).logits  # (B, T, V): the ensemble needs them
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            member_sums[i] -= float(picked[real].sum())
            token_logprobs.append(picked)
        count += int(real.sum())
        if token_logprobs:
            mixed = torch.logsumexp(torch.stack(token_logprobs), dim=0) - math.log(len(models))
            ensemble_sum -= float(mixed[real].sum())
    members = [figures(s, count, text_bytes) for s in member_sums]
    return {"members": members, "ensemble": figures(ensemble_sum, count, text_bytes) if len(models) > 1 else None}


def evaluate_batches(model, batches: Iterable, text_bytes: int) -> dict:
    """One model's figures (see `evaluate_models`)."""
    return evaluate_models([model], batches, text_bytes)["members"][0]


def text_batches(ids: list[int], window: int, batch_size: int = 8):
    """Non-overlapping windows of `window` + 1 tokens -> (input, target, mask) batches (no padding)."""
    rows = [ids[i : i + window + 1] for i in range(0, max(len(ids) - 1, 1), window)]
    rows = [r for r in rows if len(r) > 1]
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        width = max(len(r) for r in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.zeros_like(x)
        for i, r in enumerate(group):
            x[i, : len(r) - 1] = torch.tensor(r[:-1])
            y[i, : len(r) - 1] = torch.tensor(r[1:])
        yield x, y, (x != 0).long()
