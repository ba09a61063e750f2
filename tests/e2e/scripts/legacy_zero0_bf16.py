"""A ZeRO-0 bf16 checkpoint in the layout DeepSpeed's own bf16 wrapper writes, and the masters it holds.

    python legacy_zero0_bf16.py SRC_TAG_DIR OUT_CKPT_DIR OUT.safetensors

The trainer now runs ZeRO-0 bf16 as torch.autocast over fp32 weights, so its checkpoints hold the masters
as the module itself. Checkpoints written before that change (and ZeRO-0 fp16 ones, which need a GPU) keep
half-precision module weights and the fp32 masters in the optimizer's `fp32_groups`, without names. This
script writes such a checkpoint for real: an engine with DeepSpeed's bf16 wrapper, on the model of SRC's
meta, takes one step and saves; the meta is SRC's as such a run wrote it (bf16, ZeRO-0, this run's world
size and file list, no "bf16_autocast"), and OUT.safetensors holds the masters the engine's optimizer holds,
by parameter name. One process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import save_file

from andy_dist.cli import mark_distributed_process, run_tool
from andy_dist.config import ModelConfig
from andy_dist.model import AndyLM
from andy_dist.train.checkpoint_format import write_meta
from andy_dist.train.engine import parameter_groups

TAG = "step-000001"


def main() -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mark_distributed_process()
    src, out_ckpt, out_masters = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    meta = json.loads((src / "andy_meta.json").read_text())
    cfg = ModelConfig.from_dict(meta["model_config"])
    torch.manual_seed(0)
    model = AndyLM(cfg)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.01),
                                           config=config)
    ids = torch.randint(4, cfg.vocab_size, (2, 16))
    engine.backward(engine(ids).logits.float().pow(2).mean())
    engine.step()
    engine.save_checkpoint(str(out_ckpt), tag=TAG)
    kept = {key: value for key, value in meta.items() if key not in ("format", "files", "bf16_autocast")}
    write_meta(out_ckpt / TAG, kept | {"world_size": 1, "precision": "bf16", "zero_stage": 0})
    (out_ckpt / "latest").write_text(TAG)
    tokenizer = src.parent / "tokenizer.model"  # as the trainer keeps it beside its tags
    if tokenizer.is_file():
        (out_ckpt / tokenizer.name).write_bytes(tokenizer.read_bytes())
    names = {id(param): name for name, param in engine.module.named_parameters()}
    optimizer = engine.optimizer
    save_file({names[id(half)]: master.detach().float().clone()
               for half_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups)
               for half, master in zip(half_group, master_group)}, out_masters)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_tool(main)
