"""The engine against the plain compiled loop: training tokens/s and MFU of one model size on one device.

    python tools/bench.py engine --size medium --batches 16 128 --stages 0 1 2 --compile off on   # a GPU
    python tools/bench.py engine --size tiny --batches 2 --seq-len 32 --steps 2 --warmup 1          # CPU, quick

For each batch size (sequences of --seq-len tokens, one micro-batch per step, random tokens, --precision):
  plain_compiled   the loop a user would write: torch.compile'd model, autocast, clipping, fused AdamW
                   (the baseline every other side is divided by)
  plain_eager      the same without compile
  zeroN_compile_X  the project's StepRunner through DeepSpeed, the ds_config as a run resolves it for ZeRO
                   stage N, compile=true or false
Tokens/s is timed over --steps steps after --warmup steps (which include compilation, reported as
warmup_s); CUDA is synchronized around the timed steps, a CPU is timed by this process's CPU time.
MFU = tokens/s x (6N + 12LdT) / the device's peak (andy_dist.train.flops). Peak reserved CUDA memory is
reported per side. scripts/gpu_checks.sh runs this on a GPU.
"""

from __future__ import annotations

import gc
import time

import torch

from .overhead import plain_loop_step, start_single_rank


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="medium", choices=["tiny", "small", "medium"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=4)


def _batches(vocab: int, batch: int, seq_len: int):
    from andy_dist.data.stream import collate

    generator = torch.Generator().manual_seed(0)
    return [collate([torch.randint(4, vocab, (seq_len + 1,), generator=generator).numpy() for _ in range(batch)],
                    seq_len, list(range(batch))) for _ in range(3)]


def _plain(cfg, args, device, compiled: bool):
    from andy_dist.model import AndyLM

    torch.manual_seed(0)
    return plain_loop_step(AndyLM(cfg), device, args.precision, compiled), None


def _engine(cfg, args, device, dist, batch: int, stage: int, compiled: bool):
    from andy_dist.config import BatchPlan
    from andy_dist.model import AndyLM
    from andy_dist.train import engine as ds_engine
    from andy_dist.train.lr_schedule import LrSchedule
    from andy_dist.train.settings import OptimSettings
    from andy_dist.train.step import StepRunner

    optim = OptimSettings()
    plan = BatchPlan(micro_batch_size=batch, grad_accum=1, world_size=1)
    resolved = ds_engine.resolve_ds_config({"zero_optimization": {"stage": stage}}, optim, plan, args.precision,
                                           stage)
    torch.manual_seed(0)
    engine = ds_engine.build_engine(AndyLM(cfg), resolved, optim.weight_decay)
    if compiled:
        ds_engine.compile_model(engine)
    runner = StepRunner(engine, dist, device, args.precision, stage, lr_schedule=LrSchedule(optim.lr, 10, 1000, 0.1),
                        max_grad_norm=optim.grad_clip)
    return (lambda number, mb: runner(number, [mb])), engine


def _measure(step, batches, args, device) -> dict:
    start = time.perf_counter()
    for number in range(1, args.warmup + 1):
        step(number, batches[number % len(batches)])
    _sync(device)
    warmup_s = time.perf_counter() - start
    cpu, wall = time.process_time(), time.perf_counter()
    for number in range(args.warmup + 1, args.warmup + args.steps + 1):
        step(number, batches[number % len(batches)])
    _sync(device)
    seconds = (time.perf_counter() - wall) if device.type == "cuda" else (time.process_time() - cpu)
    tokens = sum(batches[n % len(batches)].num_tokens for n in range(args.warmup + 1, args.warmup + args.steps + 1))
    return {"tokens_s": tokens / seconds, "step_ms": 1000 * seconds / args.steps, "warmup_s": round(warmup_s, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> float | None:
    """Peak reserved memory of the side just measured (GiB), then a clean slate for the next one."""
    gc.collect()
    torch._dynamo.reset()  # one compiled model per side: never reach dynamo's recompile limit
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved(device) / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def _sides(batch: int, args):
    yield "plain_compiled", "plain", None, True
    yield "plain_eager", "plain", None, False
    for stage in args.stages:
        for flag in args.compile:
            yield f"zero{stage}_compile_{flag}", "engine", stage, flag == "on"


def run(args) -> dict:
    from andy_dist.config import model_config
    from andy_dist.train.flops import MfuMeter

    dist, device = start_single_rank()
    cfg = model_config(args.size, max_seq_len=max(args.seq_len, 64))
    meter = MfuMeter(cfg, args.seq_len, device, args.precision)
    results = []
    for batch in args.batches:
        batches = _batches(cfg.vocab_size, batch, args.seq_len)
        baseline = None
        for name, kind, stage, compiled in _sides(batch, args):
            step, engine = (_plain(cfg, args, device, compiled) if kind == "plain"
                            else _engine(cfg, args, device, dist, batch, stage, compiled))
            figures = _measure(step, batches, args, device)
            del step, engine
            figures["peak_reserved_gib"] = _release(device)
            baseline = baseline or figures["tokens_s"]
            mfu = meter(figures["tokens_s"])
            row = {"batch": batch, "side": name, "tokens_s": round(figures["tokens_s"], 1),
                   "over_plain_compiled": round(figures["tokens_s"] / baseline, 3),
                   "mfu": "n/a" if mfu is None else round(mfu, 4), "step_ms": round(figures["step_ms"], 2),
                   "warmup_s": figures["warmup_s"], "peak_reserved_gib": figures["peak_reserved_gib"]}
            results.append(row)
            print(row, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, 1 thread"
    return {"device": name, "setup": f"{args.size}, {args.precision}, {args.seq_len} tokens per sequence, one "
                                     f"micro-batch per step, {args.steps} timed steps after {args.warmup}",
            "mfu_peak": meter.describe(), "torch": torch.__version__, "results": results}
