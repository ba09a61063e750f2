"""The speed figures of a training log line: wall-clock and compute-only tokens/s, data wait, MFU, ETA.

Each log line covers one window of the wall clock: everything from the previous training log line
(or the start of training) to this one, i.e. the steps themselves, the waits for their data,
evaluations, samples, checkpoints and the logging. So

    train/tokens_per_s          tokens trained in the window / the window's wall-clock seconds: what the
                                run really does; the time to a number of tokens follows from it
    train/tokens_per_s_compute  the same tokens / the seconds spent inside the optimizer steps alone: the
                                engine's speed, what changes with the model, precision, ZeRO stage, kernels
    train/data_wait_fraction    share of the window spent waiting for the next step's batches
    train/mfu                   model FLOPs of the window's samples, each at its own length (6N + 12LdT per
                                token), per wall-clock second, over the peak of all devices
    train/mfu_compute           the same per second of step time
    time/eta_s                  steps left x wall-clock seconds per step since training started (evaluations
                                and checkpoints included at the rate they came so far)

Tokens are real input tokens of the global batch (padding excluded), counted once for all ranks.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class SpeedWindow:
    """Accumulates one window between log lines; `read(step)` returns its figures and opens the next."""

    def __init__(self, world_size: int, total_steps: Optional[int] = None, mfu_meter=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.world_size, self.total_steps, self.mfu_meter, self._clock = world_size, total_steps, mfu_meter, clock
        self._started: Optional[float] = None
        self._steps_since_start = 0
        self._open(clock())

    def _open(self, now: float) -> None:
        self._window_start = now
        self._tokens = 0
        self._flops = 0.0
        self._compute_s = 0.0
        self._wait_s = 0.0

    def start(self) -> None:
        """Training starts now: the first window and the ETA's clock begin here (set-up is left out)."""
        now = self._clock()
        self._started = now
        self._steps_since_start = 0
        self._open(now)

    def waited(self, seconds: float) -> None:
        """Time spent waiting for a step's batches."""
        self._wait_s += seconds

    def stepped(self, tokens: int, seconds: float, flops: Optional[float] = None) -> None:
        """One optimizer step: its global real tokens, the seconds inside the step, its model FLOPs."""
        self._tokens += tokens
        self._compute_s += seconds
        self._flops += flops or 0.0
        self._steps_since_start += 1

    def read(self, step: int) -> dict[str, Optional[float]]:
        """The window's figures (None: unknown); the next window starts now."""
        now = self._clock()
        wall = max(now - self._window_start, 1e-9)
        compute = max(self._compute_s, 1e-9)
        figures = {
            "train/tokens_per_s": self._tokens / wall,
            "train/tokens_per_s_per_rank": self._tokens / wall / self.world_size,
            "train/tokens_per_s_compute": self._tokens / compute,
            "train/data_wait_fraction": min(1.0, self._wait_s / wall),
            "train/mfu": self._mfu(self._flops / wall),
            "train/mfu_compute": self._mfu(self._flops / compute),
            "time/eta_s": self._eta_s(step, now),
        }
        self._open(now)
        return figures

    def _mfu(self, flops_per_s: float) -> Optional[float]:
        if self.mfu_meter is None or not self._flops:
            return None
        return self.mfu_meter.utilization(flops_per_s / self.world_size)

    def _eta_s(self, step: int, now: float) -> Optional[float]:
        started = self._started if self._started is not None else self._window_start
        if self.total_steps is None or not self._steps_since_start:
            return None
        per_step = (now - started) / self._steps_since_start
        return max(self.total_steps - step, 0) * per_step
