"""Choosing the next token from a row of scores: repetition penalty, temperature, top-k, top-p.

The order, applied to fp32 scores (B, V) at every step:

  1. repetition penalty: for every token already "seen" by the row, a positive score is divided by
     the penalty and a negative one multiplied by it (CTRL, Keskar et al. 2019), so a penalty > 1
     always makes a repeat less likely. Seen = the tokens generated so far, plus the prompt's tokens
     when `penalize_prompt` (BOS included); PAD is never counted. Each token counts once however
     often it occurred.
  2. temperature 0: take the arg-max (greedy); nothing below applies and no randomness is used.
  3. temperature T > 0: divide the scores by T.
  4. top-k (k > 0): keep the k highest scores (ties at the k-th place: torch.topk's choice).
  5. top-p (p < 1): of what is left, renormalised, keep the tokens whose more likely tokens have a
     total probability below p: the smallest set of highest-probability tokens whose total reaches p,
     plus any token exactly as likely as the last one kept (so ties never depend on sort order). The
     most likely token is always kept.
  6. draw one token from the softmax of what is left, with the caller's generator (a seed makes a
     run repeatable).

Cost: nothing here touches the vocabulary more than a few times per step. The penalty reads and
writes only the seen tokens' scores (a gather and a scatter, not a pass over V); top-p without
top-k sorts only candidates: the most likely 256 tokens, more while the nucleus of a row is not inside
them (a flat distribution ends in a full sort). The distribution is the one the rules define:
tests/unit/infer/test_token_sampling_partial.py compares it with a full sort of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from andy_dist import PAD_ID, UserError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; the defaults draw from the model's own distribution."""

    temperature: float = 1.0
    """Scores are divided by this before sampling; 0 means greedy (arg-max)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p; 1 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already seen (positive scores divided, negative multiplied); 1 is off."""
    penalize_prompt: bool = True
    """Whether the prompt's tokens count as seen for the repetition penalty (generated ones always do)."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"--top-k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (B, V) float; seen (B, L) long: the token ids each row has seen, repeats allowed, PAD
    where there is none -> penalised scores (a new tensor)."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seen)  # (B, L); a repeated id reads, and later writes, the same value
    penalised = torch.where(picked > 0, picked / penalty, picked * penalty)
    penalised = torch.where(seen == PAD_ID, picked, penalised)  # PAD never counts
    return scores.scatter(1, seen, penalised)


def outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, K) sorted high to low (a prefix of a distribution, or all of it) -> (B, K) bool,
    True for the tokens top-p drops: those whose strictly more likely tokens already total p."""
    above = probs.cumsum(-1) - probs  # the probability ranked above each token
    run_start = torch.ones_like(probs, dtype=torch.bool)
    run_start[:, 1:] = probs[:, 1:] != probs[:, :-1]
    # A token tied with the ones before it gets the mass above the first of them.
    above = above.masked_fill(~run_start, float("-inf")).cummax(-1).values
    return above >= top_p


# Top-p over the whole vocabulary looks at this many candidates first, then 16x more at a time, or all of
# them at once when the mass still missing cannot fit in a quarter of V. One core, 50,000 entries, ms per
# row: top 256 0.07, top 4,096 0.53, a full sort 3.1: a nucleus of a few hundred tokens costs 1/40 of a
# sort, a flat distribution (a nucleus of most of V) a sort and a top 256.
NUCLEUS_CANDIDATES = 256


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, V) probabilities -> (sorted candidate probabilities, their ids, which of them top-p
    drops), with enough candidates that every row's nucleus ends inside them."""
    vocab = probs.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    while True:
        top, ids = torch.topk(probs, k, dim=-1)  # (B, k), sorted high to low
        drop = outside_nucleus(top, top_p)
        if k == vocab or bool(drop[:, -1].all()):  # the last candidate dropped: so is every token below
            return top, ids, drop
        # Tokens below the k-th are at most as likely as it: the nucleus needs at least `need` candidates.
        need = k + int(((top_p - top.sum(-1)).clamp(min=0) / top[:, -1]).max().ceil())
        k = vocab if need > vocab // 4 else min(max(k * 16, need), vocab)  # a quarter of V: half a sort


def top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Filter (B, V) scores; returns (the kept candidates' scores (B, K), sorted high to low with
    -inf for those top-p drops, their token ids), or (scores, None) when neither filter applies."""
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        scores, ids = torch.topk(scores, top_k, dim=-1)  # (B, k), sorted high to low
        if top_p < 1.0:  # renormalised over the k kept
            scores = scores.masked_fill(outside_nucleus(torch.softmax(scores, dim=-1), top_p), float("-inf"))
        return scores, ids
    if top_p >= 1.0:
        return scores, None
    top, ids, drop = _nucleus(torch.softmax(scores, dim=-1), top_p)
    return scores.gather(-1, ids).masked_fill(drop, float("-inf")), ids


def next_token(
    scores: torch.Tensor, cfg: SamplingConfig, seen: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """(B, V) scores -> (B,) next token ids, following the order in this module's docstring.
    seen: (B, L) token ids for the repetition penalty (see `apply_repetition_penalty`)."""
    scores = scores.float()
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return scores.argmax(dim=-1)
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    scores, ids = top_k_top_p(scores, cfg.top_k, cfg.top_p)
    choice = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)
