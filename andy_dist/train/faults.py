"""Fault injection and tracing for the reliability tests, in one object built from the environment.

A crash at the worst moment of a save, a non-finite loss, a stalled rank: none can be timed from
outside a process, so the tests ask for them through environment variables, and the training code
calls this object at named points. With none of the variables set (every real run) each call is a
cheap no-op and nothing here touches the training step.

    ANDY_FAULT_NAN_STEPS=3,5      the loss of those optimizer steps is NaN on every rank
    ANDY_FAULT_STALL=STEP:SECONDS rank 0 sleeps before that step (a stalled rank)
    ANDY_FAULT_KILL_IN_SAVE=TAG   rank 0 dies by SIGKILL after every rank wrote TAG's files and before
                                  the meta marks it complete (the moment a crash is hardest to tell
                                  from a finished save)
    ANDY_TRACE_SAMPLES=PREFIX     each rank appends {"step", "samples"} per step to PREFIX.rankR
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Mapping

import torch


def _steps(text: str) -> set[int]:
    return {int(s) for s in text.split(",") if s.strip()}


class FaultHooks:
    def __init__(self, rank: int = 0, nan_steps: set[int] = frozenset(), stall: tuple[int, float] | None = None,
                 kill_in_save: str | None = None, trace_prefix: str | None = None):
        self.rank = rank
        self.nan_steps = set(nan_steps)
        self.stall = stall
        self.kill_in_save = kill_in_save
        self._trace = open(f"{trace_prefix}.rank{rank}", "a") if trace_prefix else None
        self._step = 0  # the optimizer step under way (1-based), for the NaN hook

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] | None = None) -> "FaultHooks":
        env = os.environ if environ is None else environ
        stall = env.get("ANDY_FAULT_STALL", "")
        step, _, seconds = stall.partition(":")
        return cls(rank, nan_steps=_steps(env.get("ANDY_FAULT_NAN_STEPS", "")),
                   stall=(int(step), float(seconds)) if stall else None,
                   kill_in_save=env.get("ANDY_FAULT_KILL_IN_SAVE") or None,
                   trace_prefix=env.get("ANDY_TRACE_SAMPLES") or None)

    def install(self, model: torch.nn.Module) -> None:
        """Make the model's loss NaN during the listed steps (a forward hook: the step code stays clean)."""
        if self.nan_steps:
            model.register_forward_hook(self._poison_loss)

    def _poison_loss(self, module, args, output):
        if self._step in self.nan_steps and module.training and output.loss_sum is not None:
            return output._replace(loss_sum=output.loss_sum * float("nan"))
        return output

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) starts."""
        self._step = step
        if self.stall and self.rank == 0 and step == self.stall[0]:
            time.sleep(self.stall[1])

    def after_step(self, step: int, sample_ids) -> None:
        """Called once step `step` is done, with the ids of the samples this rank trained on."""
        if self._trace:
            self._trace.write(json.dumps({"step": step, "samples": [int(i) for i in sample_ids]}) + "\n")
            self._trace.flush()

    def before_commit(self, tag: str) -> None:
        """Called on rank 0 after every rank wrote checkpoint `tag` and before its meta makes it complete."""
        if self.kill_in_save == tag:
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultHooks()
