"""Gradient of one global batch of 8 variable-length sequences, split three ways (run by tests/dist/test_engine.py).

Under the launcher given (python: 1 rank; torchrun: 2 ranks), the same 8 sequences are fed as
    accumulated:  micro-batches of 1 or 2 (4 per rank x ranks ... ) with gradient accumulation
    whole:        one micro-batch per rank, no accumulation
and the gradients the optimizer would see (after DeepSpeed's reduction, before the step) are
compared with a plain PyTorch reference: d(sum of all token losses) / (all target tokens).
Rank 0 writes the max absolute differences as JSON to argv[1].
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.config import ModelConfig  # noqa: E402
from andy_dist.data.stream import collate  # noqa: E402
from andy_dist.model import AndyLM  # noqa: E402
from andy_dist.train.distenv import detect  # noqa: E402
from andy_dist.train.engine import build_engine, init_distributed, shutdown_distributed  # noqa: E402
from andy_dist.train.step import PendingStep, StepRunner  # noqa: E402

CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, dropout=0.0)
LENGTHS = [5, 31, 12, 64, 7, 40, 3, 22]  # very different lengths: per-micro-batch means would weight them wrongly


def sequences():
    rng = np.random.default_rng(0)
    return [rng.integers(4, CFG.vocab_size, size=n) for n in LENGTHS]


def engine_for(micro: int, accum: int, world: int):
    torch.manual_seed(0)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "train_batch_size": micro * accum * world, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "fused": True}},
          "gradient_clipping": 0.0, "steps_per_print": 10**9}  # the step runner clips (andy_dist.train.step)
    return build_engine(AndyLM(CFG), ds, weight_decay=0.0)


def captured_gradient(micro: int, world: int, rank: int, device, dist, normalise_per_micro=False):
    per_rank = len(LENGTHS) // world
    mine = sequences()[rank * per_rank:(rank + 1) * per_rank]
    accum = per_rank // micro
    engine = engine_for(micro, accum, world)
    batches = [collate(mine[i * micro:(i + 1) * micro], 10**6, range(micro)) for i in range(accum)]
    runner = StepRunner(engine, dist, device, "fp32", 0)
    if normalise_per_micro:  # the common mistake, to show the test can tell the difference
        runner = _PerMicroMean(engine, dist, device)
    pending = runner.forward_backward(batches)
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}  # what the optimizer sees
    runner.apply(pending)
    return grads


class _PerMicroMean(StepRunner):
    def __init__(self, engine, dist, device):
        super().__init__(engine, dist, device, "fp32", 0)

    def forward_backward(self, micro_batches, preempted=False):
        for index, mb in enumerate(micro_batches):
            out = self.engine(mb.input_ids, targets=mb.targets)
            self.engine.backward(out.loss_sum / out.target_tokens)
            if index < len(micro_batches) - 1:
                self.engine.step()
        return PendingStep(torch.zeros((), dtype=torch.float64), torch.zeros(5, dtype=torch.float64))


def reference_gradient():
    torch.manual_seed(0)
    model = AndyLM(CFG)
    batch = collate(sequences(), 10**6, range(8))
    out = model(batch.input_ids, targets=batch.targets)
    (out.loss_sum / batch.num_target_tokens).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main():
    dist = detect()
    device = init_distributed(dist)
    reference = reference_gradient()
    results = {}
    for name, micro in (("accumulated", 1 if dist.world_size == 2 else 2), ("whole", 8 // dist.world_size)):
        grads = captured_gradient(micro, dist.world_size, dist.rank, device, dist)
        results[name] = max((grads[n] - reference[n]).abs().max().item() for n in reference)
    grads = captured_gradient(1 if dist.world_size == 2 else 2, dist.world_size, dist.rank, device, dist,
                              normalise_per_micro=True)
    results["per_micro_mean"] = max((grads[n] - reference[n]).abs().max().item() for n in reference)
    results["reference_scale"] = max(g.abs().max().item() for g in reference.values())
    if dist.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    run_tool(main)  # exits without interpreter teardown, as launch/train.py does
