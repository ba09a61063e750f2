"""torch.compile: training tokens/s of a model size through the engine, compiled against eager.

    python tools/bench.py compile [--size tiny] [--precision fp32] [--stage 0] [--batch 16] [--seq-len 256]
                                  [--steps 20] [--warmup 3]

One rank on this machine (one thread on CPU), the project's StepRunner through DeepSpeed with the ds_config
a run resolves for --stage and --precision, same model, same batches, both sides in this run:
  eager_tokens_s       optimizer steps of the eager model, timed after --warmup steps (on CPU: this process's
                       CPU time, so that other processes' load does not count; on CUDA: wall time)
  compiled_tokens_s    the same with `compile=true` (andy_dist.train.engine.compile_model); the warm-up
                       steps include compilation, reported apart as compile_s
The two sides take their timed steps in turns.
  compiled_over_eager  the ratio (1.0: compile buys nothing)
"""

from __future__ import annotations

import time

import torch

from .overhead import start_single_rank


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")


def _batches(vocab: int, args):
    from andy_dist.data.stream import collate

    generator = torch.Generator().manual_seed(0)
    return [collate([torch.randint(4, vocab, (args.seq_len + 1,), generator=generator).numpy()
                     for _ in range(args.batch)], args.seq_len, list(range(args.batch))) for _ in range(4)]


def _runner(compiled: bool, args, dist, device):
    from andy_dist.config import BatchPlan, model_config
    from andy_dist.model import AndyLM
    from andy_dist.train import engine as ds_engine
    from andy_dist.train.settings import OptimSettings
    from andy_dist.train.step import StepRunner

    cfg = model_config(args.size, max_seq_len=max(args.seq_len, 64))
    optim = OptimSettings()
    plan = BatchPlan(micro_batch_size=args.batch, grad_accum=1, world_size=1)
    resolved = ds_engine.resolve_ds_config({"zero_optimization": {"stage": args.stage}}, optim, plan, args.precision,
                                           args.stage)
    torch.manual_seed(0)
    engine = ds_engine.build_engine(AndyLM(cfg, activation_checkpointing=args.activation_checkpointing), resolved,
                                    optim.weight_decay)
    if compiled:
        ds_engine.compile_model(engine)
    return StepRunner(engine, dist, device, args.precision, args.stage, max_grad_norm=optim.grad_clip), cfg


def _timed(runner, step: int, batch, device) -> tuple[float, float, int]:
    """(CPU seconds of this process, wall seconds, tokens) of one optimizer step."""
    cpu, wall = time.process_time(), time.perf_counter()
    tokens = runner(step, [batch]).input_tokens
    _sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    dist, device = start_single_rank()
    sides = {"eager": _runner(False, args, dist, device), "compiled": _runner(True, args, dist, device)}
    batches = _batches(sides["eager"][1].vocab_size, args)
    warmup_s = {}
    for name, (runner, _) in sides.items():
        start = time.perf_counter()
        for step in range(1, args.warmup + 1):
            runner(step, [batches[step % len(batches)]])
        warmup_s[name] = time.perf_counter() - start
    # Timed in turns, a step of each side per round, so that load from other processes falls on both alike;
    # on CPU the figure is this process's CPU time (other processes on the machine do not count).
    spent = {name: [0.0, 0.0, 0] for name in sides}
    for step in range(args.warmup + 1, args.warmup + args.steps + 1):
        for name, (runner, _) in sides.items():
            cpu, wall, tokens = _timed(runner, step, batches[step % len(batches)], device)
            spent[name] = [spent[name][0] + cpu, spent[name][1] + wall, spent[name][2] + tokens]
    clock = 0 if device.type == "cpu" else 1
    eager, compiled = ({"tokens_s": spent[n][2] / spent[n][clock], "step_ms": 1000 * spent[n][clock] / args.steps,
                        "warmup_s": warmup_s[n]} for n in ("eager", "compiled"))
    return {"setup": f"{args.size}, {args.precision}, ZeRO-{args.stage}, {args.batch} x {args.seq_len} tokens, "
                     f"one rank on {device.type}" + (", 1 thread" if device.type == "cpu" else "")
                     + (", activation checkpointing" if args.activation_checkpointing else ""),
            "eager_tokens_s": round(eager["tokens_s"], 1), "compiled_tokens_s": round(compiled["tokens_s"], 1),
            "compiled_over_eager": round(compiled["tokens_s"] / eager["tokens_s"], 3),
            "eager_step_ms": round(eager["step_ms"], 2), "compiled_step_ms": round(compiled["step_ms"], 2),
            "compile_s": round(compiled["warmup_s"] - eager["warmup_s"], 1), "timed_steps": args.steps}
