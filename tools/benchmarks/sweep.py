"""Sweep: what pruning saves. The same trial budget of the tiny model with and without the median pruner.

    python tools/bench.py sweep [--trials 8] [--max-steps 40] [--eval-interval 5]

Both studies run through tools/sweep.py in the same run, on the same shards (built-in corpus,
2,000-piece tokenizer, samples <= 128 tokens), with the random sampler and the same seed, so both
try the same settings in the same order (lr log-uniform 1e-5..3e-3, weight decay, dropout); the only
difference is whether trials are pruned (median rule after --pruner-startup complete trials).
  steps_*            optimizer steps trained, all trials together
  best_val_loss_*    the best validation loss any trial reached
  steps_ratio        pruned / unpruned: the share of training the pruned study paid for
  best_val_ratio     pruned / unpruned: 1.0 = pruning lost nothing; above 1 = a worse best trial
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from andy_dist.data.corpus import read_documents, write_default_corpus
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--trials", type=int, default=8, help="trials per study")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps per trial")
    parser.add_argument("--eval-interval", type=int, default=5, help="steps between validations (pruning points)")
    parser.add_argument("--pruner-startup", type=int, default=2, help="complete trials before the pruner acts")
    parser.add_argument("--seed", type=int, default=0, help="the random sampler's seed (both studies)")


def _space(path: Path, eval_interval: int) -> Path:
    path.write_text(yaml.safe_dump({
        "ds_config": "ds_configs/tiny.json",
        "fixed": {"model.vocab_size": 2000, "precision": "fp32", "warmup_steps": 5, "eval_interval": eval_interval,
                  "log_interval": 5, "save_interval": 100000, "sample_prompts": [], "wandb": "disabled"},
        "params": {"lr": {"low": 1e-5, "high": 3e-3, "log": True}, "weight_decay": {"low": 0.0, "high": 0.1},
                   "model.dropout": {"choices": [0.0, 0.1]}},
    }))
    return path


def _study(work: Path, name: str, pruner: str, args, env: dict) -> dict:
    import optuna

    from andy_dist.sweep.storage import open_storage
    from andy_dist.sweep.summary import trial_rows

    out = work / name
    command = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--space", str(work / "space.yaml"),
               "--data", str(work / "shards"), "--tokenizer", str(work / "tok" / "tokenizer.model"), "--out", str(out),
               "--trials", str(args.trials), "--max-steps", str(args.max_steps), "--sampler", "random",
               "--seed", str(args.seed), "--pruner", pruner, "--pruner-startup", str(args.pruner_startup)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"sweep ({pruner}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    rows = trial_rows(optuna.load_study(study_name=name, storage=open_storage(None, out, 60, with_heartbeat=False)))
    losses = [r.best_val_loss for r in rows if r.best_val_loss is not None and r.outcome == "complete"]
    return {"steps": sum(r.steps or 0 for r in rows), "best_val_loss": min(losses),
            "pruned": sum(r.outcome == "pruned" for r in rows), "seconds": time.perf_counter() - start,
            "params": [r.params for r in rows]}


def run(args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_default_corpus(work / "stdlib.jsonl", max_bytes=1_000_000)
        tok = train_tokenizer(read_documents([str(corpus)]), 2000, work / "tok")
        write_shards([str(corpus)], tok, work / "shards", val_fraction=0.05, workers=1, max_seq_len=128,
                     progress=False)
        _space(work / "space.yaml", args.eval_interval)
        pruned = _study(work, "pruned", "median", args, env)
        full = _study(work, "unpruned", "none", args, env)
    if pruned.pop("params") != full.pop("params"):
        raise RuntimeError("the two studies tried different settings; the comparison would not be fair")
    return {
        "setup": f"tiny (vocab 2000), 1 rank, {args.trials} trials x {args.max_steps} steps, validation every "
                 f"{args.eval_interval}, random sampler seed {args.seed}, median pruner after {args.pruner_startup}",
        "steps_pruned": pruned["steps"], "steps_unpruned": full["steps"],
        "steps_ratio": round(pruned["steps"] / full["steps"], 3),
        "best_val_loss_pruned": round(pruned["best_val_loss"], 4),
        "best_val_loss_unpruned": round(full["best_val_loss"], 4),
        "best_val_ratio": round(pruned["best_val_loss"] / full["best_val_loss"], 4),
        "trials_pruned": pruned["pruned"],
        "seconds_pruned": round(pruned["seconds"], 1), "seconds_unpruned": round(full["seconds"], 1),
    }
