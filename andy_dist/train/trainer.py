"""The training loop, readable top to bottom: step, log, evaluate, keep best, stop early, checkpoint.

Numerics of one optimizer step (`StepRunner`):
  * The loss of every micro-batch is a SUM over its target tokens; before the step the ranks
    agree on the target-token count of the whole global batch, and each micro-batch's sum is
    scaled by world x accumulation / global_tokens. DeepSpeed divides by accumulation and
    averages over ranks, so the gradient is exactly d(sum of all token losses)/global_tokens:
    accumulating 4 x 2 sequences equals 1 x 8, whatever their lengths.
  * The data pipeline pads on the right. With causal attention a real token never attends to
    a later (padding) position, so no attention mask is needed in training and SDPA keeps its
    fast causal kernels; padded positions have PAD targets and add nothing to the loss.
  * Dropout is re-seeded from (seed, step, rank) each step, so a resumed run draws the same
    dropout masks as an uninterrupted one without saving RNG state.
  * A non-finite loss on any rank marks the step skipped on every rank: DeepSpeed skips the
    optimizer step itself when the gradient norm is not finite (fp16, bf16, any ZeRO stage);
    for fp32 without ZeRO the gradients are dropped before the step so AdamW leaves those
    weights and moments untouched.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist

from andy_dist.train import checkpoint as ckpt
from andy_dist.config import ModelConfig, TrainConfig
from andy_dist.train.distenv import DistEnv
from andy_dist.train.engine import current_lr, full_state_dict
from andy_dist.train.metrics import Throughput, memory_gb, validation_metrics
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
    early_stopped: bool = False
    wandb_run_id: str | None = None
    data: dict = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the global batch
    target_tokens: int  # global
    input_tokens: int  # global, padding excluded
    padded_positions: int  # global
    total_positions: int  # global
    skipped: bool
    preempt: bool  # some rank received SIGTERM
    seconds: float


def fault_steps(name: str) -> set[int]:
    """Steps listed in the environment variable `name` (fault injection for the reliability tests)."""
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


class StepRunner:
    """One optimizer step over this rank's micro-batches, with the loss normalised over the global batch."""

    def __init__(self, engine, dist: DistEnv, device: torch.device, precision: str, zero_stage: int):
        self.engine, self.dist, self.device = engine, dist, device
        self.precision, self.zero_stage = precision, zero_stage

    def __call__(self, micro_batches, inject_nan: bool = False, preempted: bool = False,
                 before_step: Callable[[], None] | None = None) -> StepResult:
        start = time.perf_counter()
        engine, dist = self.engine, self.dist
        # One collective up front: the global batch's target tokens (the loss normaliser). It stays on
        # the device: reading it back would make the GPU drain its queue before the forward pass.
        local = torch.tensor([sum(int(mb.num_target_tokens) for mb in micro_batches)], dtype=torch.float64)
        global_targets = self._all_reduce_in_place(local)[0]
        scale = (dist.world_size * len(micro_batches) / global_targets.clamp(min=1.0)).float()  # the loss is fp32
        # Summed on the device: a .cpu() per micro-batch would stall the GPU queue each time.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        input_tokens = padded = positions = 0
        for index, mb in enumerate(micro_batches):
            mb = mb.to(self.device)
            out = engine(mb.input_ids, targets=mb.targets)  # (B, T) in, summed loss out; no mask: see module doc
            loss = out.loss_sum * float("nan") if inject_nan else out.loss_sum
            loss_sum += loss.detach().double()
            input_tokens += int(mb.num_tokens)
            positions += mb.input_ids.numel()
            padded += mb.input_ids.numel() - int(mb.num_tokens)
            engine.backward(loss * scale)
            if index == len(micro_batches) - 1:
                # Before the optimizer step the ranks agree on the loss (a non-finite value anywhere skips
                # the step everywhere); the SIGTERM flag rides along, as ranks may get it at different moments.
                counts = torch.tensor([input_tokens, padded, positions, float(preempted)], dtype=torch.float64)
                summed = self._all_reduce_in_place(torch.cat([loss_sum[None], counts.to(loss_sum.device)]))
                totals = torch.cat([summed, global_targets[None].to(summed.device)]).cpu()  # the step's one read-back
                skipped = not math.isfinite(totals[0].item())
                if skipped and self.zero_stage == 0 and self.precision == "fp32":
                    for param in engine.module.parameters():
                        param.grad = None  # torch AdamW skips parameters without gradients
                    if before_step is not None:
                        before_step()
                    with _skipped_fp32_step(engine):
                        engine.step()
                    continue
                if before_step is not None:
                    before_step()
            engine.step()
        return StepResult(loss=totals[0].item() / max(totals[5].item(), 1.0), target_tokens=int(totals[5].item()),
                          input_tokens=int(totals[1].item()), padded_positions=int(totals[2].item()),
                          total_positions=int(totals[3].item()), skipped=skipped, preempt=totals[4].item() > 0,
                          seconds=time.perf_counter() - start)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, returned on the CPU."""
        return self._all_reduce_in_place(tensor).cpu()

    def _all_reduce_in_place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, left where the collective ran: gloo reduces CPU tensors, NCCL GPU ones."""
        if self.dist.world_size > 1:
            tensor = tensor.to(self.device) if self.device.type == "cuda" else tensor
            torch_dist.all_reduce(tensor)
        return tensor


class _skipped_fp32_step:
    """engine.step() for a skipped step of plain fp32 training (ZeRO-0), whose gradients were dropped.

    Two things DeepSpeed does for its own optimizers (ZeRO, bf16, fp16) on a non-finite gradient are done
    here by hand: the step counts as skipped and the LR schedule holds (the engine reads the optimizer's
    `overflow` flag), so both paths give the same schedule after a skip. Gradient clipping is off for this
    one call: DeepSpeed's fp32 clipping indexes the first parameter that has a gradient and raises
    IndexError when none has (found by the NaN fault test).
    """

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        config = self.engine._config
        self.clipping, config.gradient_clipping = config.gradient_clipping, 0.0
        self.optimizer = self.engine.optimizer
        self.optimizer.overflow = True

    def __exit__(self, *exc):
        self.engine._config.gradient_clipping = self.clipping
        self.optimizer.overflow = False
        return False


class Trainer:
    def __init__(self, engine, stream, val_stream_factory: Callable[[], Any], cfg: TrainConfig, model_cfg: ModelConfig,
                 dist: DistEnv, device: torch.device, logger, ckpt_dir: Path, run_meta: dict,
                 precision: str, zero_stage: int, state: TrainState | None = None,
                 sampler: Callable[[dict | None, int], list[dict]] | None = None,
                 total_steps: int | None = None, val_text_bytes: int | None = None, mfu_meter=None,
                 on_evaluation: Callable[[int, float], bool] | None = None):
        self.engine = engine
        self.stream = stream
        self.val_stream_factory = val_stream_factory
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.dist = dist
        self.device = device
        self.logger = logger
        self.ckpt_dir = Path(ckpt_dir)
        self.run_meta = run_meta
        self.precision = precision
        self.zero_stage = zero_stage
        self.state = state or TrainState()
        self.sampler = sampler
        self.total_steps = total_steps
        self.val_text_bytes = val_text_bytes
        self.throughput = Throughput(total_steps=total_steps)
        self.mfu_meter = mfu_meter
        # Called on every rank after each evaluation with (step, validation loss); the run stops at that
        # step, checkpointed, if any rank's call returns True. All ranks must pass one, or none.
        self.on_evaluation = on_evaluation
        self._preempted = False
        self._nan_steps = fault_steps("ANDY_FAULT_NAN_STEPS")
        # "STEP:SECONDS": rank 0 sleeps before that step (a stalled rank, for the stall-report test).
        stall = os.environ.get("ANDY_FAULT_STALL", "")
        self._stall_fault = tuple(float(v) for v in stall.split(":")) if stall else None
        self._watchdog: StallReporter | None = None
        self._window: list[StepResult] = []
        self._start_time = time.time()
        self._start_step = self.state.step
        self._last_eval_step: int | None = None
        self.run_step = StepRunner(engine, dist, device, precision, zero_stage)
        trace = os.environ.get("ANDY_TRACE_SAMPLES")  # debugging/tests: which samples each step consumed
        self._trace = open(f"{trace}.rank{dist.rank}", "a") if trace else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with StallReporter(self.cfg.stall_report_s, self.dist.rank) as self._watchdog:
                self._fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._watchdog = None
        return self.state

    def _fit(self) -> None:
        while not self._finished():
            for item in self.stream.iter_epoch():
                if self._stall_fault and self.dist.is_main and self.state.step + 1 == self._stall_fault[0]:
                    time.sleep(self._stall_fault[1])
                torch.manual_seed(self.cfg.seed * 1_000_003 + self.state.step * 7919 + self.dist.rank)
                result = self.run_step(item.micro_batches, inject_nan=(self.state.step + 1) in self._nan_steps,
                                       preempted=self._preempted)
                if self._trace:
                    self._trace.write(json.dumps({"step": self.state.step + 1,
                                                  "samples": [int(i) for i in item.sample_ids]}) + "\n")
                    self._trace.flush()
                self._after_step(result)
                self._progress(f"step {self.state.step}")
                if result.preempt:
                    self.save()
                    raise TrainingStopped(f"SIGTERM: checkpoint saved at step {self.state.step}; "
                                          f"resume with --resume", EXIT_PREEMPTED)
                if self.cfg.eval_interval and self.state.step % self.cfg.eval_interval == 0:
                    self.evaluate()
                if self.state.step % self.cfg.save_interval == 0:
                    self.save()
                if self._finished():
                    break
            else:  # the epoch ran to its end
                self.evaluate()
        if self._last_eval_step != self.state.step and not self.state.early_stopped:
            self.evaluate()  # every run ends validated, so `best` always exists
        if self.state.step % self.cfg.save_interval:
            self.save()

    def _finished(self) -> bool:
        if self.state.early_stopped:
            return True
        if self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps:
            return True
        return self.cfg.max_steps is None and self.stream.epoch >= self.cfg.max_epochs

    def _after_step(self, result: StepResult) -> None:
        state = self.state
        state.step += 1
        state.tokens_seen += result.input_tokens
        state.data = self.stream.state_dict()
        if result.skipped:
            state.skipped_steps += 1
            state.bad_steps_in_row += 1
            if state.bad_steps_in_row >= self.cfg.max_bad_steps:
                # The skipped steps left the weights as they were before the divergence.
                self.save()
                raise TrainingStopped(
                    f"{state.bad_steps_in_row} steps in a row had a non-finite loss (last at step {state.step}); "
                    f"stopped with a checkpoint from before the divergence. Lower lr or check the data.",
                    EXIT_DIVERGED)
        else:
            state.bad_steps_in_row = 0
        self._window.append(result)
        self.throughput.update(result.input_tokens, result.seconds)
        if state.step % self.cfg.log_interval == 0 or state.step == 1:
            self._log_training()
        if self.cfg.sample_interval and state.step % self.cfg.sample_interval == 0:
            self._log_samples()

    def _log_training(self) -> None:
        window, self._window = self._window, []
        finite = [r.loss for r in window if math.isfinite(r.loss)]
        tokens_per_s = self.throughput.tokens_per_s
        metrics = {
            "train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "train/lr": current_lr(self.engine),
            "train/grad_norm": _grad_norm(self.engine),
            "train/tokens_per_s": tokens_per_s,
            "train/tokens_per_s_per_rank": tokens_per_s / self.dist.world_size,
            "train/mfu": (self.mfu_meter(tokens_per_s / self.dist.world_size) if self.mfu_meter else None) or "n/a",
            "train/global_batch_seqs": self.run_meta["global_batch_size"],
            "train/global_batch_tokens": window[-1].input_tokens,
            "train/padding_fraction": sum(r.padded_positions for r in window) / max(1, sum(r.total_positions for r in window)),
            "train/tokens_seen": self.state.tokens_seen,
            "train/epoch": self.stream.epoch,
            "sys/memory_gb": memory_gb(self.device),
            "time/elapsed_s": time.time() - self._start_time,
            "time/eta_s": self.throughput.eta_s(self.state.step),
        }
        if self.device.type == "cuda":
            metrics["sys/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.precision == "fp16" or self.state.skipped_steps:
            metrics["train/skipped_steps"] = self.state.skipped_steps
        if self.precision == "fp16":
            metrics["train/loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        self.logger.log(self.state.step, metrics)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        engine = self.engine
        self._last_eval_step = self.state.step
        engine.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per batch
        targets = 0
        with torch.no_grad():
            for mb in self.val_stream_factory():
                mb = mb.to(self.device)
                out = engine(mb.input_ids, targets=mb.targets)
                loss_sum += out.loss_sum.double()
                targets += int(mb.num_target_tokens)
        engine.train()
        sums = self.run_step.all_reduce(torch.tensor([loss_sum.item(), targets], dtype=torch.float64))
        val_loss = sums[0].item() / max(sums[1].item(), 1.0)
        state = self.state
        improved = math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss - self.cfg.min_delta)
        if improved:
            state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
        else:
            state.bad_evals += 1
        state.data = self.stream.state_dict()
        metrics = validation_metrics(val_loss, int(sums[1].item()), self.val_text_bytes or 0, state.best_val_loss,
                                     state.bad_evals, self.cfg.patience) if self.val_text_bytes else {
            "val/loss": val_loss, "val/best_loss": state.best_val_loss, "val/bad_evals": state.bad_evals}
        self.logger.log(state.step, metrics)
        if improved:
            ckpt.save_best(engine, self.ckpt_dir, asdict(state), self.run_meta)
        if state.bad_evals >= self.cfg.patience:
            state.early_stopped = True
            if self.dist.is_main:
                print(f"early stopping at step {state.step}: {state.bad_evals} evaluations without improving on "
                      f"{state.best_val_loss:.4f} (step {state.best_step})", flush=True)
        self._log_samples()
        self._progress(f"evaluation at step {state.step}")
        if self.on_evaluation is not None and self._any_rank(self.on_evaluation(state.step, val_loss)):
            self.save()
            raise TrainingStopped(f"stopped after the evaluation at step {state.step}, as the evaluation hook "
                                  f"asked; checkpoint saved", EXIT_STOP_REQUESTED)
        return val_loss

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (one small all-reduce)."""
        return self.run_step.all_reduce(torch.tensor([float(bool(flag))], dtype=torch.float64))[0].item() > 0

    def _log_samples(self) -> None:
        if self.sampler is None or not self.cfg.sample_prompts:
            return
        weights = full_state_dict(self.engine)  # every rank takes part in the gather
        if self.dist.is_main:
            self.logger.log_samples(self.state.step, self.sampler(weights, self.state.step))

    # ------------------------------------------------------------------ checkpoints and signals
    def save(self) -> None:
        self.state.data = self.stream.state_dict()
        ckpt.save(self.engine, self.ckpt_dir, ckpt.step_tag(self.state.step), asdict(self.state), self.run_meta,
                  keep_last=self.cfg.keep_last)
        self._progress(f"checkpoint at step {self.state.step}")

    def _progress(self, what: str) -> None:
        if self._watchdog is not None:
            self._watchdog.progress(what)

    def _on_sigterm(self, signum, frame) -> None:
        self._preempted = True


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

