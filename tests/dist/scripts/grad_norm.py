"""What the step reports, on every ZeRO stage x precision (run by tests/dist/test_engine.py under torchrun).

For ZeRO 0-3 x fp32/bf16 the engine is built as a run builds it (resolve_ds_config, StepRunner) and
takes three steps on this rank's half of a fixed batch of 8 variable-length sequences:
  1. an ordinary step: its reported gradient norm, against the norm of the whole batch's gradient in a
     plain PyTorch loop (fp32, rank 0); clipping at 0.05 bites, so a post-clipping norm would show;
  2. the loss poisoned to NaN on every rank (the forward's output, as ANDY_FAULT_NAN_STEPS does);
  3. a finite loss whose gradient overflows (a backward hook on the head multiplies its incoming
     gradient by inf).
Rank 0 writes one JSON row per configuration to argv[1]: the three StepResults' figures and whether
each of steps 2 and 3 left the weights as they were.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.config import BatchPlan, ModelConfig  # noqa: E402
from andy_dist.data.stream import collate  # noqa: E402
from andy_dist.model import AndyLM  # noqa: E402
from andy_dist.train import engine as ds_engine  # noqa: E402
from andy_dist.train.distenv import detect  # noqa: E402
from andy_dist.train.settings import OptimSettings  # noqa: E402
from andy_dist.train.step import StepRunner  # noqa: E402

CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, dropout=0.0)
LENGTHS = [5, 31, 12, 64, 7, 40, 3, 22]
MAX_NORM = 0.05


def sequences():
    rng = np.random.default_rng(0)
    return [rng.integers(4, CFG.vocab_size, size=n) for n in LENGTHS]


def reference_norm() -> float:
    torch.manual_seed(0)
    model = AndyLM(CFG)
    batch = collate(sequences(), 10**6, range(len(LENGTHS)))
    out = model(batch.input_ids, targets=batch.targets)
    (out.loss_sum / batch.num_target_tokens).backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def weights(engine) -> dict[str, torch.Tensor]:
    full = ds_engine.full_state_dict(engine)  # every rank takes part (ZeRO-3 gathers)
    return full or {}


class Poison:
    """Forward and backward hooks that spoil one step: a NaN loss, or a finite loss with an inf gradient."""

    def __init__(self, model):
        self.nan_loss = self.inf_grad = False
        model.register_forward_hook(self._forward)
        model.lm_head.register_full_backward_pre_hook(self._backward)

    def _forward(self, module, args, output):
        return output._replace(loss_sum=output.loss_sum * float("nan")) if self.nan_loss else output

    def _backward(self, module, grad_output):
        # The head returns (loss sum, target count): the count has no gradient.
        return tuple(None if g is None else g * float("inf") for g in grad_output) if self.inf_grad else None


def run_configuration(stage: int, precision: str, dist, device) -> dict:
    plan = BatchPlan(micro_batch_size=len(LENGTHS) // dist.world_size, grad_accum=1, world_size=dist.world_size)
    optim = OptimSettings(lr=1e-3, weight_decay=0.0, grad_clip=MAX_NORM)
    resolved = ds_engine.resolve_ds_config({"zero_optimization": {"stage": stage}}, optim, plan, precision, stage)
    torch.manual_seed(0)
    model = AndyLM(CFG)
    poison = Poison(model)
    engine = ds_engine.build_engine(model, resolved, optim.weight_decay)
    runner = StepRunner(engine, dist, device, precision, stage, max_grad_norm=MAX_NORM)
    per_rank = len(LENGTHS) // dist.world_size
    mine = sequences()[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    batch = collate(mine, 10**6, range(len(mine)))
    row = {"stage": stage, "precision": precision}
    for name in ("ordinary", "nan_loss", "inf_grad"):
        poison.nan_loss, poison.inf_grad = name == "nan_loss", name == "inf_grad"
        before = weights(engine)
        result = runner(1, [batch])
        after = weights(engine)
        unchanged = bool(before) and all(torch.equal(before[k], after[k]) for k in before)
        row[name] = {"grad_norm": result.grad_norm, "loss": result.loss, "skipped": result.skipped,
                     "overflow": result.overflow, "weights_unchanged": unchanged}
    return row


def main():
    dist = detect()
    device = ds_engine.init_distributed(dist)
    rows = [run_configuration(stage, precision, dist, device)
            for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
    if dist.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"reference_norm": reference_norm(), "rows": rows}))
    ds_engine.shutdown_distributed()


if __name__ == "__main__":
    run_tool(main)  # exits without interpreter teardown, as launch/train.py does
