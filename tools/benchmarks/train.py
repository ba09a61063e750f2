"""Training: tokens/s of the tiny model on 2 CPU ranks through the engine vs a plain PyTorch DDP loop.

    python tools/bench.py train [--steps 20] [--warmup 10] [--seq-len 256] [--shipped]

Both sides in the same run, on the same shards (built-in corpus, 10,000-piece tokenizer), same
model (tiny, fp32), same global batch (16 sequences x 1 accumulation x 2 ranks = 32), launched by
torchrun with one thread per rank:
  engine_tokens_s    launch/train.py (DeepSpeed ZeRO-1, the trainer's loop, logging every step): tokens
                     of the timed steps over their wall clock, from its metrics.jsonl (train/tokens_per_s
                     is the wall clock between log lines: steps, data waits, logging)
  engine_compute_tokens_s  the same tokens over the time inside the optimizer steps alone
                     (train/tokens_per_s_compute), and engine_data_wait_fraction
  plain_tokens_s     tools/benchmarks/_plain_loop.py (DDP + torch AdamW), same steps, same batches, wall
                     clock of its loop (data included)
  engine_over_plain  the ratio of the two wall-clock figures: 1.0 = no engine overhead
With --shipped the engine side runs ds_configs/tiny.json as shipped (bf16, ZeRO-1) instead of fp32, against
the same fp32 baseline: nanoGPT's train.py on a CPU also trains in fp32 (its autocast is CUDA-only), so this
is "our shipped config vs nanoGPT's loop at the same shape and batch".
  engine_mfu         the trainer's wall-clock MFU over the timed steps (each sample's FLOPs at its own
                     length, 6N + 12LdT per token, against the matmul peak each rank measured on its one
                     thread), engine_mfu_compute inside the steps, and plain_mfu the baseline against the
                     same peak (same batches, so the same FLOPs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from andy_dist.data.corpus import read_documents, write_default_corpus
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MICRO, ACCUM, RANKS = 16, 1, 2


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=256, help="samples are cut to this many tokens")
    parser.add_argument("--shipped", action="store_true",
                        help="the engine side as ds_configs/tiny.json ships (bf16, ZeRO-1), not fp32")


def _torchrun(script: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port",
               str(29500 + os.getpid() % 1000), str(script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{script.name} failed:\n{result.stderr[-3000:]}")
    return result


def run(args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_default_corpus(work / "stdlib.jsonl", max_bytes=3_000_000)
        tok = train_tokenizer(read_documents([str(corpus)]), 10_000, work / "tok")
        write_shards([str(corpus)], tok, work / "shards", val_fraction=0.01, workers=1, max_seq_len=args.seq_len,
                     progress=False)
        total = args.warmup + args.steps
        _torchrun(ROOT / "launch" / "train.py",
                  ["--ds_config", "ds_configs/tiny.json", "--data", str(work / "shards"), "--tokenizer", str(tok),
                   "--out", str(work / "run"), "--max-steps", str(total),
                   *([] if args.shipped else ["precision=fp32", "zero_stage=1"]), f"micro_batch_size={MICRO}",
                   "log_interval=1", "save_interval=100000", "sample_prompts=[]", "eval_interval=100000"], env)
        logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        engine_figures = _engine_figures([m for m in logged if "train/loss" in m], args.warmup)
        _torchrun(ROOT / "tools" / "benchmarks" / "_plain_loop.py",
                  [str(work / "shards"), str(work / "plain.json"), str(args.steps), str(args.warmup), str(MICRO),
                   str(ACCUM), "10000"], env)
        plain = json.loads((work / "plain.json").read_text())["tokens_per_s"]
    # Both MFUs against the peak each trainer rank measured for itself at start-up (a peak measured
    # here, beside other processes, would not be the one the engine divided by).
    engine, engine_mfu = engine_figures["engine_tokens_s"], engine_figures["engine_mfu"]
    return {
        "setup": f"tiny {'as shipped (bf16, ZeRO-1)' if args.shipped else 'fp32'} vs a plain fp32 DDP loop, "
                 f"{RANKS} CPU ranks x 1 thread, global batch {MICRO * ACCUM * RANKS}, "
                 f"samples <= {args.seq_len} tokens",
        **engine_figures,
        "plain_tokens_s": round(plain, 1),
        "engine_over_plain": round(engine / plain, 3),
        "plain_mfu": round(engine_mfu * plain / engine, 4) if isinstance(engine_mfu, float) else "n/a",
        "timed_steps": args.steps,
    }


def _engine_figures(training: list[dict], warmup: int) -> dict:
    """Wall-clock and compute tokens/s, data wait and MFU over the steps after `warmup`, from log lines of
    every step: each line's window is its tokens over its own rate."""
    tokens = {m["step"]: m["train/tokens_seen"] for m in training}
    timed = [m for m in training if m["step"] > warmup]
    trained = [tokens[m["step"]] - tokens[m["step"] - 1] for m in timed]
    wall = [t / m["train/tokens_per_s"] for t, m in zip(trained, timed)]
    compute = [t / m["train/tokens_per_s_compute"] for t, m in zip(trained, timed)]
    waited = sum(w * m["train/data_wait_fraction"] for w, m in zip(wall, timed))
    mfu = [m["train/mfu"] for m in timed]
    known = all(isinstance(v, float) for v in mfu)
    return {
        "engine_tokens_s": round(sum(trained) / sum(wall), 1),
        "engine_compute_tokens_s": round(sum(trained) / sum(compute), 1),
        "engine_data_wait_fraction": round(waited / sum(wall), 4),
        "engine_mfu": round(sum(v * w for v, w in zip(mfu, wall)) / sum(wall), 4) if known else "n/a",
        "engine_mfu_compute": round(sum(m["train/mfu_compute"] * c for m, c in zip(timed, compute)) / sum(compute), 4)
        if known else "n/a",
    }
