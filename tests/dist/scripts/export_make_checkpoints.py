"""Run under `torchrun --nproc_per_node 2`: train a tiny AndyLM for 2 steps with DeepSpeed for each
(ZeRO stage, precision) pair, save a checkpoint in the trainer's layout, and save the weights the
engine holds (gathered from all ranks) as safetensors, so the export can be compared against them.

    torchrun --nproc_per_node 2 export_make_checkpoints.py OUT_DIR TOKENIZER_MODEL STAGE:PRECISION ...

Writes OUT_DIR/zS-PREC/checkpoints/{latest, step-000002/, best/, tokenizer.model} and
OUT_DIR/zS-PREC/engine_weights.safetensors (fp32 copies of the engine's module parameters).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from andy_dist.cli import mark_distributed_process, run_tool
from andy_dist.config import ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.model import AndyLM


def train_and_save(out: Path, tokenizer: Tokenizer, stage: int, precision: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, n_layers=2, max_seq_len=64, dropout=0.0)
    model = AndyLM(cfg)
    ds_config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(4, cfg.vocab_size, (2, 17), generator=generator)
        out_ = engine(ids[:, :-1].to(engine.device), targets=ids[:, 1:].to(engine.device))
        loss = out_.loss_sum / out_.target_tokens
        engine.backward(loss)
        engine.step()
    ckpt = out / "checkpoints"
    meta = {"format": 1, "model_config": cfg.to_dict(), "step": 2, "tokenizer_sha256": tokenizer.sha256,
            "zero_stage": stage, "world_size": dist.get_world_size(), "precision": precision}
    for tag in ("step-000002", "best"):
        engine.save_checkpoint(str(ckpt), tag=tag, client_state={"andy": {"step": 2}}, save_latest=(tag != "best"))
        if rank == 0:
            (ckpt / tag / "andy_meta.json").write_text(json.dumps(meta))
    if rank == 0:
        (ckpt / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    # The weights the engine holds, gathered to every rank for ZeRO-3.
    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            weights = {name: p.detach().to(torch.float32).clone() for name, p in params.items()}
    else:
        weights = {name: p.detach().to(torch.float32).clone() for name, p in params.items()}
    assert all(p.dtype == dtype for p in params.values()) or stage == 3
    if rank == 0:
        save_file(weights, str(out / "engine_weights.safetensors"))
    dist.barrier()


def main() -> None:
    out_dir, tokenizer_path, *runs = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    mark_distributed_process()
    tokenizer = Tokenizer.from_file(tokenizer_path)
    for run in runs:
        stage, precision = run.split(":")
        train_and_save(Path(out_dir) / f"z{stage}-{precision}", tokenizer, int(stage), precision)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_tool(main)  # exits without interpreter teardown, as launch/train.py does
