"""The training loop, readable top to bottom: step, log, evaluate, keep best, stop early, checkpoint.

The numerics of one optimizer step live in `andy_dist.train.step`; this module decides when to
validate, save, sample and stop, and what a resume must remember (`TrainState`).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from andy_dist.train import checkpoint as ckpt
from andy_dist.train.checkpoint_format import step_tag
from andy_dist.train.engine import full_state_dict
from andy_dist.train.faults import NO_FAULTS, FaultHooks
from andy_dist.train.metrics import memory_gb, validation_metrics
from andy_dist.train.nonfatal import nonfatal
from andy_dist.train.sample_quality import summarize
from andy_dist.train.settings import LoopSettings
from andy_dist.train.step import StepResult, StepRunner
from andy_dist.train.throughput import SpeedWindow
from andy_dist.train.watchdog import StallReporter


class TrainingStopped(Exception):
    """The run ended before its planned end (SIGTERM, divergence); `exit_code` says how."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# SIGTERM (SLURM pre-emption): checkpoint, then exit with this code so a job script can requeue.
EXIT_PREEMPTED = 75
EXIT_DIVERGED = 3
# An evaluation hook asked the run to stop (a hyper-parameter search pruned it): checkpoint, then this code.
EXIT_STOP_REQUESTED = 76


@dataclass
class TrainState:
    """What the trainer must remember across a resume (the data position is kept by the stream)."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    overflow_skips: int = 0  # steps DeepSpeed's fp16 loss scaler skipped (finite loss, overflowing gradient)
    early_stopped: bool = False
    wandb_run_id: str | None = None
    data: dict = field(default_factory=dict)


@dataclass
class TrainData:
    """What the trainer reads: the training stream, a fresh validation pass on demand, and the plan's length."""

    stream: Any  # andy_dist.data.stream.TrainStream
    make_val_stream: Callable[[], Iterable]
    total_steps: int
    val_text_bytes: int | None = None  # for bits per byte; None: not reported


@dataclass
class Monitor:
    """Where figures and samples go, and how often."""

    logger: Any  # andy_dist.train.metrics.MetricsLogger
    mfu_meter: Any = None  # andy_dist.train.flops.MfuMeter
    samples: Callable[[dict | None, int], list[dict]] | None = None  # andy_dist.train.samples.TrainingSamples
    log_interval: int = 10
    sample_interval: int | None = None
    stall_report_s: float | None = 300.0
    # Called on every rank after each evaluation with (step, validation loss); the run stops at that step,
    # checkpointed, if any rank's call returns True (a hyper-parameter search pruning the trial).
    on_evaluation: Callable[[int, float], bool] | None = None


@dataclass
class Checkpoints:
    """Where checkpoints go and what each one records about the run."""

    directory: Path
    run_meta: dict


class Trainer:
    def __init__(self, step: StepRunner, data: TrainData, loop: LoopSettings, monitor: Monitor,
                 checkpoints: Checkpoints, state: TrainState | None = None, faults: FaultHooks = NO_FAULTS):
        self.step, self.engine, self.dist, self.device = step, step.engine, step.dist, step.device
        self.data, self.loop, self.monitor, self.checkpoints, self.faults = data, loop, monitor, checkpoints, faults
        self.state = state or TrainState()
        self.speed = SpeedWindow(step.dist.world_size, data.total_steps, monitor.mfu_meter)
        self._preempted = False
        self._watchdog: StallReporter | None = None
        self._window: list[StepResult] = []
        self._start_time = time.time()
        self._last_eval_step: int | None = None
        self._last_sample_step: int | None = None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with StallReporter(self.monitor.stall_report_s, self.dist.rank) as self._watchdog:
                self._fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._watchdog = None
        return self.state

    def _fit(self) -> None:
        self.speed.start()
        while not self._finished():
            for item in self._timed(self.data.stream.iter_epoch()):
                step = self.state.step + 1
                self.faults.before_step(step)
                result = self.step(step, item.micro_batches, preempted=self._preempted)
                self.faults.after_step(step, item.sample_ids)
                self.speed.stepped(result.input_tokens, result.seconds, self._flops(item))
                self._after_step(result)
                self._progress(f"step {self.state.step}")
                if result.preempt:
                    self.save()
                    raise TrainingStopped(f"SIGTERM: checkpoint saved at step {self.state.step}; "
                                          f"resume with --resume", EXIT_PREEMPTED)
                if self.loop.eval_interval and self.state.step % self.loop.eval_interval == 0:
                    self._validate()
                if self.state.step % self.loop.save_interval == 0:
                    self.save()
                if self._finished():
                    break
            else:  # the epoch ran to its end
                self._validate()
        if not self.state.early_stopped:
            self._validate()  # every run ends validated, so `best` always exists
        if self.state.step % self.loop.save_interval:
            self.save()

    def _validate(self) -> None:
        """Evaluate, unless this step already was: the same weights give the same loss, which would count as
        an evaluation without improvement and spend patience (an epoch end that eval_interval also hits)."""
        if self._last_eval_step != self.state.step:
            self.evaluate()

    def _timed(self, items: Iterable):
        """`items`, with the time spent waiting for each one counted as data wait."""
        iterator = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.speed.waited(time.perf_counter() - started)
            yield item

    def _flops(self, item) -> float | None:
        """Model FLOPs of the step: every sample of the global batch at its own length."""
        meter = self.monitor.mfu_meter
        return meter.step_flops(item.global_lengths) if meter is not None else None

    def _finished(self) -> bool:
        if self.state.early_stopped:
            return True
        if self.loop.max_steps is not None and self.state.step >= self.loop.max_steps:
            return True
        return self.loop.max_steps is None and self.data.stream.epoch >= self.loop.max_epochs

    def _after_step(self, result: StepResult) -> None:
        state = self.state
        state.step += 1
        state.tokens_seen += result.input_tokens
        state.data = self.data.stream.state_dict()
        state.overflow_skips += int(result.overflow)
        if result.skipped:
            state.skipped_steps += 1
            state.bad_steps_in_row += 1
            if state.bad_steps_in_row >= self.loop.max_bad_steps:
                # The skipped steps left the weights as they were before the divergence.
                self.save()
                raise TrainingStopped(
                    f"{state.bad_steps_in_row} steps in a row had a non-finite loss (last at step {state.step}); "
                    f"stopped with a checkpoint from before the divergence. Lower lr or check the data.",
                    EXIT_DIVERGED)
        else:
            state.bad_steps_in_row = 0
        self._window.append(result)
        if state.step % self.monitor.log_interval == 0 or state.step == 1:
            window, self._window = self._window, []
            with nonfatal("logging the training figures", state.step):
                self._log_training(window)
        if self.monitor.sample_interval and state.step % self.monitor.sample_interval == 0:
            self._log_samples()

    def _log_training(self, window: list[StepResult]) -> None:
        finite = [r.loss for r in window if math.isfinite(r.loss)]
        metrics = {
            "train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "train/lr": window[-1].lr,  # the rate the last step trained at
            "train/grad_norm": window[-1].grad_norm,  # its global norm before clipping
            **self.speed.read(self.state.step),  # tokens/s (wall clock and compute), data wait, MFU, ETA
            "train/global_batch_seqs": self.checkpoints.run_meta["global_batch_size"],
            "train/global_batch_tokens": window[-1].input_tokens,
            "train/padding_fraction": (sum(r.padded_positions for r in window)
                                        / max(1, sum(r.total_positions for r in window))),
            "train/tokens_seen": self.state.tokens_seen,
            "train/epoch": self.data.stream.epoch,
            "sys/memory_gb": memory_gb(self.device),
            "time/elapsed_s": time.time() - self._start_time,
        }
        if self.device.type == "cuda":
            metrics["sys/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            # What the caching allocator holds (what the card must have), not only what tensors use.
            metrics["sys/peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        # Steps skipped for a non-finite loss or gradient (the run stops after max_bad_steps in a row), and apart
        # from them the steps fp16 loss scaling skipped for an overflow.
        metrics["train/skipped_steps"] = self.state.skipped_steps
        metrics["train/overflow_skips"] = self.state.overflow_skips
        if self.step.precision == "fp16":
            metrics["train/loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        self.monitor.logger.log(self.state.step, metrics)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        engine = self.engine
        self._last_eval_step = self.state.step
        engine.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per batch
        targets = 0
        with torch.no_grad():
            for mb in self.data.make_val_stream():
                mb = mb.to(self.device)
                out = engine(mb.input_ids, targets=mb.targets)
                loss_sum += out.loss_sum.double()
                targets += int(mb.num_target_tokens)
        engine.train()
        sums = self.step.all_reduce(torch.tensor([loss_sum.item(), targets], dtype=torch.float64))
        val_loss = sums[0].item() / max(sums[1].item(), 1.0)
        state = self.state
        improved = math.isfinite(val_loss) and (state.best_val_loss is None
                                                or val_loss < state.best_val_loss - self.loop.min_delta)
        if improved:
            state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
        else:
            state.bad_evals += 1
        state.data = self.data.stream.state_dict()
        text_bytes = self.data.val_text_bytes
        with nonfatal("logging the validation figures", state.step):
            metrics = validation_metrics(val_loss, int(sums[1].item()), text_bytes, state.best_val_loss,
                                         state.bad_evals, self.loop.patience) if text_bytes else {
                "val/loss": val_loss, "val/best_loss": state.best_val_loss, "val/bad_evals": state.bad_evals}
            self.monitor.logger.log(state.step, metrics)
        if improved:
            ckpt.save_best(engine, self.checkpoints.directory, asdict(state), self.checkpoints.run_meta)
        if state.bad_evals >= self.loop.patience:
            state.early_stopped = True
            if self.dist.is_main:
                print(f"early stopping at step {state.step}: {state.bad_evals} evaluations without improving on "
                      f"{state.best_val_loss:.4f} (step {state.best_step})", flush=True)
        self._log_samples()
        self._progress(f"evaluation at step {state.step}")
        hook = self.monitor.on_evaluation
        if hook is not None and self._any_rank(hook(state.step, val_loss)):
            self.save()
            raise TrainingStopped(f"stopped after the evaluation at step {state.step}, as the evaluation hook "
                                  f"asked; checkpoint saved", EXIT_STOP_REQUESTED)
        return val_loss

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (one small all-reduce)."""
        return self.step.all_reduce(torch.tensor([float(bool(flag))], dtype=torch.float64))[0].item() > 0

    def _log_samples(self) -> None:
        if self.monitor.samples is None or self._last_sample_step == self.state.step:
            return  # (a step that is both a sampling step and an evaluation samples once)
        self._last_sample_step = self.state.step
        weights = full_state_dict(self.engine)  # every rank takes part in the gather
        if self.dist.is_main:
            with nonfatal("the training samples", self.state.step):
                rows = self.monitor.samples(weights, self.state.step)
                self.monitor.logger.log_samples(self.state.step, rows)
                if rows:
                    self.monitor.logger.log(self.state.step, summarize(rows))  # samples/*: the round's means

    # ------------------------------------------------------------------ checkpoints and signals
    def save(self) -> None:
        self.state.data = self.data.stream.state_dict()
        ckpt.save(self.engine, self.checkpoints.directory, step_tag(self.state.step), asdict(self.state),
                  self.checkpoints.run_meta, keep_last=self.loop.keep_last, before_commit=self.faults.before_commit)
        self._progress(f"checkpoint at step {self.state.step}")

    def _progress(self, what: str) -> None:
        if self._watchdog is not None:
            self._watchdog.progress(what)

    def _on_sigterm(self, signum, frame) -> None:
        self._preempted = True

