"""Choosing the next token from a row of scores: repetition penalty, temperature, top-k, top-p.

The order, applied to fp32 scores (B, V) at every step:

  1. repetition penalty: for every token already "seen" by the row, a positive score is divided by
     the penalty and a negative one multiplied by it (CTRL, Keskar et al. 2019), so a penalty > 1
     always makes a repeat less likely. Seen = the tokens generated so far, plus the prompt's tokens
     when `penalize_prompt` (BOS included); PAD is never counted. Each token counts once however
     often it occurred.
  2. temperature 0: take the arg-max (greedy); nothing below applies and no randomness is used.
  3. temperature T > 0: divide the scores by T.
  4. top-k (k > 0): keep the k highest scores.
  5. top-p (p < 1): of what is left, renormalised, keep the smallest set of highest-probability
     tokens whose total reaches p; the most likely token is always kept.
  6. draw one token from the softmax of what is left, with the caller's generator (a seed makes a
     run repeatable).
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
    """scores (B, V) float, seen (B, V) bool -> penalised scores (a new tensor)."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Filter (B, V) scores; returns (kept scores, their token ids) where filtering narrowed the
    vocabulary to the top-k columns, or (scores with -inf outside the nucleus, None)."""
    ids = None
    if 0 < top_k < scores.shape[-1]:
        scores, ids = torch.topk(scores, top_k, dim=-1)  # (B, k), sorted high to low
    if top_p < 1.0:
        if ids is None:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        else:
            sorted_scores, order = scores, None  # topk is already sorted
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach p; the first is always kept.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = sorted_scores if order is None else torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    return scores, ids


def next_token(
    scores: torch.Tensor, cfg: SamplingConfig, seen: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """(B, V) scores -> (B,) next token ids, following the order in this module's docstring."""
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


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Record tokens (B,) or (B, T) as seen in place; PAD never counts."""
    seen.scatter_(1, tokens.reshape(seen.shape[0], -1), True)
    seen[:, PAD_ID] = False
