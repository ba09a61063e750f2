"""The learning rate of optimizer step k, in closed form: linear warmup, then cosine decay.

    k <= W          lr * k / W                                   (step 1 already trains, at lr / W)
    W < k < N       lr * (m + (1 - m) * (1 + cos(pi * (k - W) / (N - W))) / 2)
    k >= N          lr * m

with W = warmup_steps, N = the schedule's length (lr_decay_steps, else the run's planned steps) and
m = min_lr_ratio; W = 0 starts the cosine at step 1. Step k is the 1-based number of the optimizer
step, skipped steps included, so the rate depends on nothing but k: a resumed run and one that never
stopped train every step at the same rate.

Why not DeepSpeed's WarmupCosineLR: it trains its first two steps at its start ratio (0 by default: two
steps of data spent for nothing), reaches the peak at step W + 2, and refuses W = 0. The step runner sets
this value on the optimizer before each step instead, and logs the value the step used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LrSchedule:
    peak: float
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        """The learning rate optimizer step `step` (1-based) trains at."""
        warmup, total = self.warmup_steps, max(self.total_steps, self.warmup_steps + 1)
        if step <= warmup:
            return self.peak * step / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return self.peak * (self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0)
