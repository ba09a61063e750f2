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
  * A non-finite loss on any rank marks the step skipped on every rank: DeepSpeed skips the
    optimizer step itself when the gradient norm is not finite (fp16, bf16, any ZeRO stage);
    for fp32 without ZeRO the gradients are dropped before the step so AdamW leaves those
    weights and moments untouched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from andy_dist.train.distenv import DistEnv


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


class StepRunner:
    """Runs optimizer steps of the engine over this rank's micro-batches."""

    def __init__(self, engine, dist: DistEnv, device: torch.device, precision: str, zero_stage: int, seed: int = 0):
        self.engine, self.dist, self.device = engine, dist, device
        self.precision, self.zero_stage, self.seed = precision, zero_stage, seed

    def __call__(self, step: int, micro_batches, preempted: bool = False) -> StepResult:
        """Optimizer step number `step` (1-based): forward and backward of every micro-batch, then the update."""
        start = time.perf_counter()
        # Dropout masks from (seed, steps done before this one, rank); see the module doc.
        torch.manual_seed(self.seed * 1_000_003 + (step - 1) * 7919 + self.dist.rank)
        result = self.forward_backward(micro_batches, preempted)
        self.apply(skipped=result.skipped)
        result.seconds = time.perf_counter() - start
        return result

    def forward_backward(self, micro_batches, preempted: bool = False) -> StepResult:
        """Accumulate the gradient of the global batch, up to the last micro-batch's backward; the ranks
        agree on the loss and the counts. `apply` then finishes the step."""
        engine = self.engine
        # One collective up front: the global batch's target tokens (the loss normaliser). It stays on
        # the device: reading it back would make the GPU drain its queue before the forward pass.
        local = torch.tensor([sum(int(mb.num_target_tokens) for mb in micro_batches)], dtype=torch.float64)
        global_targets = self._all_reduce_in_place(local)[0]
        scale = (self.dist.world_size * len(micro_batches) / global_targets.clamp(min=1.0)).float()  # fp32 loss
        # Summed on the device: a .cpu() per micro-batch would stall the GPU queue each time.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        input_tokens = padded = positions = 0
        for index, mb in enumerate(micro_batches):
            mb = mb.to(self.device)
            out = engine(mb.input_ids, targets=mb.targets)  # (B, T) in, summed loss out; no mask: see module doc
            loss_sum += out.loss_sum.detach().double()
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
        totals = torch.cat([summed, global_targets[None].to(summed.device)]).cpu().tolist()  # the step's one read-back
        loss, inputs, padded_total, positions_total, preempt, targets = totals
        return StepResult(loss=loss / max(targets, 1.0), target_tokens=int(targets), input_tokens=int(inputs),
                          padded_positions=int(padded_total), total_positions=int(positions_total),
                          skipped=not math.isfinite(loss), preempt=preempt > 0, seconds=0.0)

    def apply(self, skipped: bool) -> None:
        """The last micro-step, where the optimizer and the LR schedule step; a skipped step leaves the
        weights and moments as they were."""
        if skipped and self.zero_stage == 0 and self.precision == "fp32":
            for param in self.engine.module.parameters():
                param.grad = None  # torch AdamW skips parameters without gradients
            with _skipped_fp32_step(self.engine):
                self.engine.step()
            return
        self.engine.step()

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
