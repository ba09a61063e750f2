"""Training: tokens/s of the tiny model on 2 CPU ranks through the engine vs a plain PyTorch DDP loop.

    python tools/bench.py train [--steps 20] [--warmup 10] [--seq-len 256]

Both sides in the same run, on the same shards (built-in corpus, 10,000-piece tokenizer), same
model (tiny, fp32), same global batch (16 sequences x 1 accumulation x 2 ranks = 32), launched by
torchrun with one thread per rank:
  engine_tokens_s    launch/train.py (DeepSpeed ZeRO-1, the trainer's loop, logging every step),
                     mean tokens/s over the timed steps from its metrics.jsonl
  plain_tokens_s     tools/benchmarks/_plain_loop.py (DDP + torch AdamW), same steps
  engine_over_plain  the ratio: 1.0 = no engine overhead
  engine_mfu         the trainer's logged MFU (FLOPs/token 6N + 12LdT against the matmul peak each
                     rank measured on its one thread), and plain_mfu the baseline against the same peak
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
                   "--out", str(work / "run"), "--max-steps", str(total), "precision=fp32", "zero_stage=1",
                   f"micro_batch_size={MICRO}", "log_interval=1", "save_interval=100000", "sample_prompts=[]",
                   "eval_interval=100000"], env)
        logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in logged if "train/loss" in m and m["step"] > args.warmup]
        # The trainer logs tokens/s smoothed over its last 20 steps; the last value covers the timed steps.
        engine = steps[-1]["train/tokens_per_s"]
        engine_mfu = steps[-1]["train/mfu"]
        _torchrun(ROOT / "tools" / "benchmarks" / "_plain_loop.py",
                  [str(work / "shards"), str(work / "plain.json"), str(args.steps), str(args.warmup), str(MICRO),
                   str(ACCUM), "10000"], env)
        plain = json.loads((work / "plain.json").read_text())["tokens_per_s"]
    # Both MFUs against the peak each trainer rank measured for itself at start-up (a peak measured
    # here, beside other processes, would not be the one the engine divided by).
    return {
        "setup": f"tiny fp32, {RANKS} CPU ranks x 1 thread, global batch {MICRO * ACCUM * RANKS}, "
                 f"samples <= {args.seq_len} tokens",
        "engine_tokens_s": round(engine, 1),
        "plain_tokens_s": round(plain, 1),
        "engine_over_plain": round(engine / plain, 3),
        "engine_mfu": engine_mfu,
        "plain_mfu": round(engine_mfu * plain / engine, 4) if isinstance(engine_mfu, float) else "n/a",
        "timed_steps": args.steps,
    }
