"""The LM head: hidden states -> scores over the token ids, and the training loss without the full logits.

The head's weight has `cfg.padded_vocab_size` rows (`ModelConfig.vocab_pad_multiple`): a 50,048-row matrix
tiles cleanly on a GPU where 50,000 leaves a ragged edge. Logits leave this module with the `vocab_size`
columns only, and the padded rows take no part in the loss (their scores are -inf there), so they get no
gradient and nothing downstream can tell that they exist.

The loss is the cross-entropy summed over non-PAD targets. The plain way, `cross_entropy(logits.float())`,
materialises fp32 logits of every token (1.6 GB for 16 x 512 tokens of medium) and autograd keeps them and
their softmax for backward. `linear_cross_entropy_sum` walks the tokens in chunks of `LOSS_CHUNK_TOKENS`:
per chunk it forms the logits, the loss, and - when gradients are wanted - the chunk's gradients with
respect to the hidden states and the weight (softmax minus one-hot, two matmuls), then drops the logits.
Backward only scales the stored gradients by the incoming one. The FLOPs are those of the plain path (no
recomputation); the peak is one chunk of logits plus the head's gradient, kept in fp32 across chunks.

Why not torch's own chunked `F.linear_cross_entropy` (new in 2.13): it returns the loss in the input's dtype,
and in bf16 the sum over 512 tokens came out 1% off (3,632 against 3,669, measured); the logged training
and validation losses need the fp32 sum the plain path gave. This one accumulates the loss in fp32 and the
head's gradient in fp32 across chunks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from andy_dist import PAD_ID
from andy_dist.config import ModelConfig

# Tokens per chunk of the loss, chosen with `python tools/bench.py memory`: a chunk's fp32 logits are
# LOSS_CHUNK_TOKENS x vocabulary x 4 bytes, and every chunk launches a dozen kernels. Medium's head at 2,048
# tokens on the 2-core CPU (fp32, best of 7): chunks of 512, 1,024 and 2,048 all took 0.83-0.85x the time of
# the full logits, at 213, 311 and 506 MB of peak against 1,183. 1,024 keeps the memory low and halves the
# kernel launches of 512 for a GPU, where larger chunks may pay more: scripts/gpu_checks.sh (step 4)
# measures 1,024-8,192 on one.
LOSS_CHUNK_TOKENS = 1024


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, vocab_size: int,
                grad_hidden: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """One chunk: its summed loss (fp32); writes its rows of grad_hidden and adds into grad_weight when given.
    A function of its own so that the chunk's logits are freed before the next chunk's are made."""
    logits = (h @ weight.T).float()  # (c, R)
    if logits.shape[1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")  # padded rows: probability 0, gradient 0
    keep = t != PAD_ID
    safe = t.masked_fill(~keep, 0)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    # log-sum-exp by hand rather than torch.logsumexp: the exponentials it needs are then the softmax the
    # gradient needs, computed once and in place (measured: a third of the elementwise time).
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(dim=1)
    loss = ((sum_exp.log() + row_max.squeeze(1) - picked) * keep).sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    grad_logits = exp.mul_((keep / sum_exp)[:, None])  # softmax; rows of PAD targets contribute nothing
    grad_logits.scatter_add_(1, safe[:, None], -keep[:, None].to(grad_logits.dtype))  # minus the one-hot
    grad_logits = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden)
    if grad_weight is not None:
        if weight.dtype == torch.float32:  # addmm with out=, not addmm_: FLOP counters know only the former
            torch.addmm(grad_weight, grad_logits.T, h, out=grad_weight)
        else:
            grad_weight += (grad_logits.T @ h).float()
    return loss


def _loss_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int,
               grad_hidden: Optional[torch.Tensor] = None, grad_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summed loss (fp32) over chunks of `chunk` rows; fills grad_hidden (N, C) and adds into grad_weight (R, C,
    fp32) the gradients of that sum when they are given."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        loss += _chunk_loss(hidden[rows], weight, targets[rows], vocab_size,
                            None if grad_hidden is None else grad_hidden[rows], grad_weight)
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss with its gradients computed in forward, a chunk at a time (so no logits are saved)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk: int):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        loss = _loss_pass(hidden, weight, targets, vocab_size, chunk, grad_hidden, grad_weight)
        # The head's gradient stays fp32 until backward has scaled it: in fp16 the unscaled sums of small
        # products would fall into the subnormal range that loss scaling exists to avoid.
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss supports one backward per forward (no retain_graph)")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        # Scaled in place: the stored gradients become the returned ones (fp32 weights: no second copy).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.float()).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                             chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """sum over non-PAD targets of cross_entropy(hidden @ weight[:vocab_size].T, target), without the logits.

    hidden (..., C), weight (R >= vocab_size, C) of the same dtype, targets (...) of token ids; fp32 scalar.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_tokens)
    return _loss_pass(hidden, weight, targets, vocab_size, chunk_tokens)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over non-PAD targets from materialised logits, and how many there were:
    the reference the chunked loss is tested against, and the loss of heads other than `LMHead` (int8).

    Summing (not averaging) lets gradient accumulation divide by the target tokens of the whole
    global batch, so 4 micro-batches of 2 give the gradient of 1 batch of 8.
    """
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=PAD_ID, reduction="sum"
    )
    return loss_sum, (targets != PAD_ID).sum()


class LMHead(nn.Linear):
    """hidden (..., C) -> logits (..., vocab_size); given targets, (summed loss, target count) instead.

    The loss is computed inside this module's forward so that ZeRO-3, which gathers a module's partitioned
    weight around that module's own forward, has the whole weight for it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.vocab_size = cfg.vocab_size
        self.loss_chunk_tokens = LOSS_CHUNK_TOKENS

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if targets is None:
            logits = super().forward(x)
            return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]
        weight = self.weight
        if torch.is_autocast_enabled(x.device.type):  # cast the weight once, not once per chunk
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                loss = linear_cross_entropy_sum(x, weight, targets, self.vocab_size, self.loss_chunk_tokens)
        else:
            loss = linear_cross_entropy_sum(x.to(weight.dtype), weight, targets, self.vocab_size,
                                            self.loss_chunk_tokens)
        return loss, (targets != PAD_ID).sum()
