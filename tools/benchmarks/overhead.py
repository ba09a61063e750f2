"""Engine overhead: ops and host syncs per optimizer step, and host time per step, engine vs plain loop.

    python tools/bench.py overhead [--stages 0 1 2] [--precision bf16] [--ds-config ds_configs/medium.json]
                                   [--steps 30] [--attribute] [--device-type cuda]

A micro model with the medium model's structure (6 blocks, untied head: 76 parameter tensors) at tiny
widths, so arithmetic is negligible and what remains is per-step host work, run one optimizer step at a
time on this machine, one rank:
  plain            an eager loop: forward (bf16 autocast over fp32 weights, or fp32), backward, clipping
                   (foreach), torch's fused AdamW; the baseline
  zeroN            the project's StepRunner through DeepSpeed with the ds_config as a run resolves it
                   (resolve_ds_config) at that ZeRO stage
For each: compute ops per step (ATen ops that launch a kernel on a GPU), host syncs per step (scalar
reads + synchronizes, DeepSpeed's CPU accelerator answering as CUDA's: andy_dist.train.overhead), where
they come from (--attribute: compute ops by the innermost DeepSpeed / project function), and the median
host time of a step (timed without the counter). Ratios are engine / plain, measured in the same run.
adamw_step_ms_tiny: one AdamW step of the tiny model with torch's fused, foreach and for-loop kernels.
tests/unit/train/test_overhead.py runs this section and holds the budgets (1 sync per step, 1.25x ops).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VOCAB, WIDTH, HEADS, SEQ, BATCH = 512, 64, 8, 64, 4


def add_arguments(parser) -> None:
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "medium.json"),
                        help="the ds_config whose settings the engine runs with (its ZeRO stage is overridden)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side (after 3 untimed)")
    parser.add_argument("--counted-steps", type=int, default=2, help="steps counted per side (the mean is kept)")
    parser.add_argument("--attribute", action="store_true", help="charge every op to the function that made it")
    parser.add_argument("--compile", action="store_true", help="compile the model (both sides)")


def micro_model():
    from andy_dist.config import model_config
    from andy_dist.model import AndyLM

    return AndyLM(model_config("medium", vocab_size=VOCAB, d_model=WIDTH, n_heads=HEADS, max_seq_len=SEQ))


def micro_batches(count: int):
    from andy_dist.data.stream import collate

    generator = torch.Generator().manual_seed(0)
    return [collate([torch.randint(4, VOCAB, (SEQ + 1,), generator=generator).numpy() for _ in range(BATCH)], SEQ,
                    list(range(BATCH))) for _ in range(count)]


def plain_step(precision: str, compiled: bool):
    """The baseline: the plain eager loop a user would write around the same model."""
    torch.manual_seed(0)
    return plain_loop_step(micro_model(), torch.device("cpu"), precision, compiled)


def plain_loop_step(model: torch.nn.Module, device: torch.device, precision: str, compiled: bool):
    """One optimizer step of the plain loop every engine benchmark is measured against: autocast (bf16),
    the loss over the target tokens, clipping at 1.0, fused AdamW. Returns `step(number, micro_batch)`."""
    model = model.to(device)
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(number, mb):
        mb = mb.to(device, non_blocking=True)
        with autocast:
            out = model(mb.input_ids, targets=mb.targets)
        (out.loss_sum / mb.num_target_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_step(ds_path: str, stage: int, precision: str, compiled: bool):
    """The project's step: the ds_config resolved as a run resolves it, the engine, the StepRunner."""
    from andy_dist.config import BatchPlan
    from andy_dist.train import engine as ds_engine
    from andy_dist.train.distenv import detect
    from andy_dist.train.lr_schedule import LrSchedule
    from andy_dist.train.settings import OptimSettings
    from andy_dist.train.step import StepRunner

    ds, _ = ds_engine.load_ds_config(ds_path)
    plan = BatchPlan(micro_batch_size=BATCH, grad_accum=1, world_size=1)
    optim = OptimSettings()
    resolved = ds_engine.resolve_ds_config(ds, optim, plan, precision, stage)
    torch.manual_seed(0)
    engine = ds_engine.build_engine(micro_model(), resolved, optim.weight_decay)
    if compiled:
        ds_engine.compile_model(engine)
    runner = StepRunner(engine, detect(), torch.device("cpu"), precision, stage,
                        lr_schedule=LrSchedule(optim.lr, 10, 1000, 0.1), max_grad_norm=optim.grad_clip)
    return (lambda number, mb: runner(number, [mb])), type(engine.optimizer).__name__


class Side:
    """One side of the comparison: its step function and the figures measured on it."""

    def __init__(self, name: str, step, optimizer: str | None = None):
        self.name, self.step, self.number = name, step, 0
        self.figures: dict = {} if optimizer is None else {"optimizer": optimizer}
        self.cpu_ms: list[float] = []
        self.wall_ms: list[float] = []

    def run(self, mb) -> None:
        self.number += 1
        self.step(self.number, mb)

    def count(self, batches, attribute: bool) -> None:
        from andy_dist.train.overhead import OverheadCounter

        counts = []
        for mb in batches:
            with OverheadCounter(attribute=attribute) as counter:
                self.run(mb)
            counts.append(counter.count)
        last = counts[-1]
        self.figures.update({
            "compute_ops": statistics.mean(c.compute_ops for c in counts),
            "host_syncs": statistics.mean(c.host_syncs for c in counts),
            "scalar_reads": statistics.mean(c.scalar_reads for c in counts),
            "synchronizes": statistics.mean(c.synchronizes for c in counts),
            "sync_sites": dict(last.syncs_by_site.most_common()),
            "top_ops": dict(last.ops.most_common(12))})
        if attribute:
            self.figures["compute_ops_by_site"] = dict(last.compute_by_site.most_common(20))

    def timed(self, mb) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.run(mb)
        self.cpu_ms.append(1000 * (time.process_time() - cpu))
        self.wall_ms.append(1000 * (time.perf_counter() - wall))

    def summary(self, baseline: "Side | None") -> dict:
        figures = dict(self.figures)
        figures["host_cpu_ms"] = round(statistics.median(self.cpu_ms), 3)
        figures["wall_ms"] = round(statistics.median(self.wall_ms), 3)
        if baseline is not None:
            for key in ("compute_ops", "host_cpu_ms", "wall_ms"):
                figures[f"{key}_over_plain"] = round(figures[key] / baseline.summary(None)[key], 3)
        return figures


def adamw_step_ms(steps: int = 20) -> dict:
    """One AdamW step over the tiny model's parameters (2.96M, 28 tensors) with each of torch's
    implementations, on this machine: which is fastest decides resolve_ds_config's choice."""
    from andy_dist.config import model_config
    from andy_dist.model import AndyLM

    figures = {}
    for name, options in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("for_loop", {"foreach": False})):
        torch.manual_seed(0)
        params = list(AndyLM(model_config("tiny")).parameters())
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **options)
        for _ in range(3):
            optimizer.step()
        start = time.process_time()
        for _ in range(steps):
            optimizer.step()
        figures[name] = round(1000 * (time.process_time() - start) / steps, 2)
    return figures


def _single_rank_environment() -> None:
    with socket.socket() as sock:  # a free port for the one-rank process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def start_single_rank():
    """A one-rank process group on this machine (one thread on a CPU); returns (DistEnv, device)."""
    from andy_dist.train.distenv import detect
    from andy_dist.train.engine import init_distributed

    _single_rank_environment()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    dist = detect()
    return dist, init_distributed(dist)


def run(args) -> dict:
    from andy_dist.train.overhead import cuda_like_accelerator

    start_single_rank()
    torch.set_num_threads(1)  # the micro model runs on the CPU on any machine
    batches = micro_batches(3 + args.counted_steps)
    with cuda_like_accelerator():
        sides = [Side("plain", plain_step(args.precision, args.compile))]
        for stage in args.stages:
            sides.append(Side(f"zero{stage}", *engine_step(args.ds_config, stage, args.precision, args.compile)))
        for side in sides:
            for mb in batches[:3]:  # warm-up: lazy state, first-call paths (and compilation)
                side.run(mb)
            side.count(batches[3:], args.attribute)
        # Timed in turns, one step of each side per round, so that load from other processes falls on all
        # sides alike; host time is this process's CPU time (the median), wall time is shown beside it.
        for index in range(args.steps):
            for side in sides:
                side.timed(batches[index % len(batches)])
    plain = sides[0]
    return {"setup": f"micro model (medium structure, d={WIDTH}, vocab {VOCAB}), {BATCH} x {SEQ} tokens, "
                     f"{args.precision}, one rank, 1 thread, ds_config {Path(args.ds_config).name}"
                     + (", compiled" if args.compile else ""),
            "torch": torch.__version__, "deepspeed": _deepspeed_version(),
            **{side.name: side.summary(None if side is plain else plain) for side in sides},
            "adamw_step_ms_tiny": adamw_step_ms()}


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
