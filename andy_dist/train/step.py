"""One optimizer step through the engine, with the loss normalised over the whole global batch.

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
  * Step k trains at the learning rate of the closed-form schedule for k (`lr_schedule`), set here.
  * The host reads the step back ONCE, after the update is queued: loss, token counts, the SIGTERM
    flag and the pre-clipping gradient norm in one copy. Everything else stays on the device, so the
    GPU never waits for the host inside a step (docs/performance.md counts what that saves).
  * Clipping and skipping (fp32/bf16 on ZeRO 0-2; `engine.step_runner_guards`): after the last
    backward the runner computes the global gradient norm on the device and hands torch's fused AdamW
    a clipping divisor (`grad_scale` = max(1, norm / max_norm)) and a skip flag (`found_inf`: the loss
    or the norm of the step is not finite on some rank). A skipped step leaves weights and moments as
    they were, on every rank, without the host deciding anything. fp16 and ZeRO-3 keep DeepSpeed's
    own clipping and overflow checks. A skipped step (`skipped`: non-finite loss or gradient) counts
    towards max_bad_steps; a skip of fp16 loss scaling with a finite loss (`overflow`) is counted apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as torch_dist

from andy_dist.train import engine as ds_engine
from andy_dist.train.distenv import DistEnv


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the global batch
    target_tokens: int  # global
    input_tokens: int  # global, padding excluded
    padded_positions: int  # global
    total_positions: int  # global
    skipped: bool  # the loss or the gradient was not finite: the update was skipped
    preempt: bool  # some rank received SIGTERM
    seconds: float
    lr: float = float("nan")  # the learning rate the step trained at
    grad_norm: float = float("nan")  # global gradient norm before clipping
    overflow: bool = False  # fp16: DeepSpeed's loss scaler skipped the step (gradient overflow, finite loss)


@dataclass
class PendingStep:
    """A step whose forward and backward passes are queued: its figures still on the device."""

    loss_sum: torch.Tensor  # global (float64)
    counts: torch.Tensor  # global input tokens, padded positions, positions, SIGTERM flag, target tokens


class StepRunner:
    """Runs optimizer steps of the engine over this rank's micro-batches."""

    def __init__(self, engine, dist: DistEnv, device: torch.device, precision: str, zero_stage: int, seed: int = 0,
                 lr_schedule: Callable[[int], float] | None = None, max_grad_norm: float = 1.0):
        self.engine, self.dist, self.device = engine, dist, device
        self.precision, self.zero_stage, self.seed = precision, zero_stage, seed
        self.lr_schedule = lr_schedule  # None: the optimizer's lr as it is (tests of the numerics)
        self.guard = (DeviceGuard(engine, device, max_grad_norm, dist.world_size)
                      if ds_engine.step_runner_guards(precision, zero_stage) else None)

    def __call__(self, step: int, micro_batches, preempted: bool = False) -> StepResult:
        """Optimizer step number `step` (1-based): forward and backward of every micro-batch, then the update."""
        start = time.perf_counter()
        # Dropout masks from (seed, steps done before this one, rank); see the module doc.
        torch.manual_seed(self.seed * 1_000_003 + (step - 1) * 7919 + self.dist.rank)
        result = self.apply(self.forward_backward(micro_batches, preempted), step)
        result.seconds = time.perf_counter() - start
        return result

    def forward_backward(self, micro_batches, preempted: bool = False) -> PendingStep:
        """Accumulate the gradient of the global batch, up to the last micro-batch's backward; the ranks
        agree on the loss and the counts. Nothing is read back: `apply` finishes the step."""
        engine = self.engine
        # One collective up front: the global batch's target tokens (the loss normaliser). It stays on
        # the device: reading it back would make the GPU drain its queue before the forward pass.
        local = torch.tensor([sum(int(mb.num_target_tokens) for mb in micro_batches)], dtype=torch.float64)
        global_targets = self._all_reduce_in_place(local)[0]
        scale = (self.dist.world_size * len(micro_batches) / global_targets.clamp(min=1.0)).float()  # fp32 loss
        # Summed on the device: a .cpu() per micro-batch would stall the GPU queue each time.
        loss_sum = None
        input_tokens = padded = positions = 0
        for index, mb in enumerate(micro_batches):
            mb = mb.to(self.device)
            out = engine(mb.input_ids, targets=mb.targets)  # (B, T) in, summed loss out; no mask: see module doc
            mb_loss = out.loss_sum.detach().double()
            loss_sum = mb_loss if loss_sum is None else loss_sum + mb_loss
            input_tokens += int(mb.num_tokens)
            positions += mb.input_ids.numel()
            padded += mb.input_ids.numel() - int(mb.num_tokens)
            engine.backward(out.loss_sum * scale)
            if index < len(micro_batches) - 1:
                engine.step()  # a micro-step: DeepSpeed counts it and updates nothing until the last one
        # The ranks agree on the loss (a non-finite value anywhere skips the step everywhere); the SIGTERM
        # flag rides along, as ranks may get it at different moments.
        counts = torch.tensor([input_tokens, padded, positions, float(preempted)], dtype=torch.float64)
        summed = self._all_reduce_in_place(torch.cat([loss_sum[None], counts.to(loss_sum.device)]))
        return PendingStep(summed[0], torch.cat([summed[1:], global_targets[None].to(summed.device)]))

    def apply(self, pending: PendingStep, step: int | None = None) -> StepResult:
        """The last micro-step, where the optimizer steps at the learning rate of `step`; then the step's one
        read-back. A skipped step leaves the weights and moments as they were."""
        lr = self.lr_schedule(step) if self.lr_schedule is not None and step is not None else float("nan")
        if math.isfinite(lr):
            ds_engine.set_learning_rate(self.engine, lr)
        norm = self.guard.prepare(pending.loss_sum) if self.guard is not None else None
        skipped_before = ds_engine.deepspeed_skipped_steps(self.engine)
        self.engine.step()
        if norm is None:
            norm = ds_engine.deepspeed_grad_norm(self.engine)  # float, tensor or None (not computed)
        figures = [pending.loss_sum[None], pending.counts]
        if isinstance(norm, torch.Tensor):
            figures.append(norm.detach().reshape(1).to(device=pending.counts.device, dtype=torch.float64))
        values = torch.cat(figures).cpu().tolist()  # the step's one read-back
        loss, inputs, padded, positions, preempt, targets = values[:6]
        grad_norm = values[6] if len(values) > 6 else (float("nan") if norm is None else float(norm))
        skipped, overflow = self._verdict(loss, grad_norm if norm is not None else 0.0,
                                          ds_engine.deepspeed_skipped_steps(self.engine) > skipped_before)
        return StepResult(loss=loss / max(targets, 1.0), target_tokens=int(targets), input_tokens=int(inputs),
                          padded_positions=int(padded), total_positions=int(positions), skipped=skipped,
                          preempt=preempt > 0, seconds=0.0, lr=lr, grad_norm=grad_norm, overflow=overflow)

    def _verdict(self, loss: float, grad_norm: float, deepspeed_skipped: bool) -> tuple[bool, bool]:
        """(skipped, overflow) of a step: see the module doc."""
        if self.precision == "fp16":
            # An overflow with a finite loss is fp16 loss scaling at work (it lowers the scale): counted apart,
            # not towards max_bad_steps.
            return not math.isfinite(loss), deepspeed_skipped and math.isfinite(loss)
        # Without loss scaling a non-finite loss or gradient is a bad step, whoever skipped it.
        return not math.isfinite(loss) or not math.isfinite(grad_norm) or deepspeed_skipped, False

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, returned on the CPU."""
        return self._all_reduce_in_place(tensor).cpu()

    def _all_reduce_in_place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, left where the collective ran: gloo reduces CPU tensors, NCCL GPU ones."""
        if self.dist.world_size > 1:
            tensor = tensor.to(self.device) if self.device.type == "cuda" else tensor
            torch_dist.all_reduce(tensor)
        return tensor


class DeviceGuard:
    """Gradient clipping and the skip of a non-finite step, decided on the device for torch's fused AdamW.

    The optimizer holds two one-element tensors of ours for good: `grad_scale` (it divides every gradient
    by it) and `found_inf` (non-zero: the whole update, step counters included, is left undone). Each step
    rewrites them in place from the step's norm and loss, so nothing waits for the host.
    """

    def __init__(self, engine, device: torch.device, max_grad_norm: float, world_size: int):
        self.engine, self.max_grad_norm, self.world_size = engine, max_grad_norm, world_size
        if not ds_engine.base_optimizer(engine).defaults.get("fused"):
            raise ValueError("the step runner's clipping needs torch's fused AdamW (resolve_ds_config sets it)")
        self.grad_scale = torch.ones((), dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def prepare(self, global_loss: torch.Tensor) -> torch.Tensor:
        """The step's global gradient norm (before clipping), with the divisor and skip flag set from it."""
        optimizer = ds_engine.base_optimizer(self.engine)
        if getattr(optimizer, "found_inf", None) is not self.found_inf:  # first step, or a new optimizer object
            optimizer.grad_scale, optimizer.found_inf = self.grad_scale, self.found_inf
        grads, partitioned = ds_engine.local_gradients(self.engine)
        device = self.grad_scale.device
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32) if grads else [torch.zeros((), device=device)]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if partitioned and self.world_size > 1:
            squares = norm.square()
            torch_dist.all_reduce(squares)  # the slices' squares add up to the whole gradient's
            norm = squares.sqrt()
        # One test for both (inf + -inf is NaN), and x * 0 != 0 only for inf and NaN: 2 kernels where
        # torch.isfinite takes 4. When the flag is up the divisor below is never used.
        either = norm + global_loss.to(device)
        self.found_inf.copy_((either * 0) != 0)
        if self.max_grad_norm > 0:  # DeepSpeed's rule: divide by (norm + 1e-6) / max_norm when that exceeds 1
            torch.div(norm + 1e-6, self.max_grad_norm, out=self.grad_scale).clamp_(min=1.0)
        return norm
