"""The fp32 master weights of ZeRO-0 checkpoints, as a DeepSpeed engine holds them after loading each one.

    python engine_masters.py CKPT_DIR TAG OUT.safetensors [CKPT_DIR TAG OUT.safetensors ...]

DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` reads ZeRO 1-3 checkpoints only. For ZeRO-0
this script builds an engine as the trainer does (the model of the checkpoint's meta, the trainer's
parameter groups, its DeepSpeed config from `resolve_ds_config`), loads the checkpoint with
`engine.load_checkpoint`, and saves what the engine's optimizer holds: where DeepSpeed keeps fp32 masters
beside half-precision weights (fp16), those masters (`fp32_groups`, matched to parameter names through the
weights they master, `fp16_groups`); otherwise (fp32, and bf16, which on ZeRO-0 is torch.autocast over fp32
weights) the parameters themselves. One process, world size 1 (a ZeRO-0 checkpoint is the same for any
world size).
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
from andy_dist.config import BatchPlan, ModelConfig
from andy_dist.model import AndyLM
from andy_dist.train.engine import parameter_groups, resolve_ds_config
from andy_dist.train.settings import OptimSettings


def masters(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    meta = json.loads((Path(ckpt_dir) / tag / "andy_meta.json").read_text())
    assert meta["zero_stage"] == 0, meta["zero_stage"]
    model = AndyLM(ModelConfig.from_dict(meta["model_config"]))
    config = resolve_ds_config({}, OptimSettings(), BatchPlan(1, 1, 1), meta["precision"], zero_stage=0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.01),
                                           config=config)
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
                                     load_module_strict=True)
    assert path is not None, f"DeepSpeed could not load {ckpt_dir}/{tag}"
    names = {id(param): name for name, param in engine.module.named_parameters()}
    optimizer = engine.optimizer
    if not hasattr(optimizer, "fp32_groups"):
        return {name: param.detach().float().clone() for name, param in engine.module.named_parameters()}
    return {names[id(half)]: master.detach().float().clone()
            for half_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for half, master in zip(half_group, master_group)}


def main() -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mark_distributed_process()
    args = sys.argv[1:]
    for ckpt_dir, tag, out in zip(args[0::3], args[1::3], args[2::3]):
        save_file(masters(ckpt_dir, tag), out)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_tool(main)
