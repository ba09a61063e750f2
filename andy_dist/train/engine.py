"""The engine: the one module of the training path that calls into DeepSpeed's Python API.

(The checkpoint code asks the engine to save and load, and runs DeepSpeed's universal-checkpoint
converter as a separate process; export reads DeepSpeed's files with `torch.load(weights_only=True)`.
Neither imports DeepSpeed, and nothing on the model or inference side does.)

Reads a `ds_configs/*.json`, merges it with the batch maths and the optimisation settings of the
run (AdamW, linear warmup then cosine, clipping), starts the process group from any launcher's
environment, and builds the engine around a plain `AndyLM`.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from andy_dist.cli import mark_distributed_process
from andy_dist.config import PRECISIONS, SIZES, BatchPlan, ConfigError
from andy_dist.train.distenv import DistEnv, accelerator, export
from andy_dist.train.settings import OptimSettings

# Keys of a ds_config that the run sets itself; a ds_config that sets them differently would be
# silently overridden, so it is refused instead.
RUN_OWNED_SECTIONS = ("optimizer", "scheduler")


def load_ds_config(path: str | Path) -> tuple[dict, dict]:
    """The DeepSpeed dict and our own "andy" section (size, activation_checkpointing, compile), split apart."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path} does not exist; see ds_configs/ for examples")
    try:
        ds = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--ds_config {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config {path} must hold a JSON object")
    andy = ds.pop("andy", {})
    owned = [key for key in RUN_OWNED_SECTIONS if key in ds]
    if owned:
        raise ConfigError(f"{path} sets {owned}: the optimizer (AdamW) and LR schedule come from the run's "
                          f"config (lr, warmup_steps, weight_decay, betas, min_lr_ratio); remove them from the JSON")
    unknown = sorted(set(andy) - {"size", "activation_checkpointing", "compile"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys in the \"andy\" section: {unknown}")
    flags = [key for key in ("activation_checkpointing", "compile") if not isinstance(andy.get(key, False), bool)]
    if flags:
        raise ConfigError(f"{path}: \"andy\": {flags} must be true or false")
    return ds, andy


def model_size(ds_path: str | Path, andy: dict, requested: str | None) -> str:
    """--size, else the ds_config's "andy": {"size"}, else its file name (ds_configs/medium.json -> medium)."""
    size = requested or andy.get("size") or Path(ds_path).stem
    if size not in SIZES:
        raise ConfigError(f"cannot tell the model size from {ds_path}: pass --size {'/'.join(SIZES)} "
                          f"or add \"andy\": {{\"size\": ...}} to the JSON")
    return size


def ds_precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def step_runner_guards(precision: str, zero_stage: int) -> bool:
    """Whether the step runner, not DeepSpeed, clips the gradient and skips non-finite steps (`andy_dist.train.step`).

    fp32 and bf16 on ZeRO 0-2: the runner does both on the device, so a step needs no read-back of its own
    (DeepSpeed's checks read every gradient's finiteness or the norm back to the host: 84 reads per step on
    ZeRO-0 bf16, 2 on ZeRO-2; docs/performance.md). fp16 keeps DeepSpeed's dynamic loss scaler, which must see
    each overflow, and ZeRO-3 keeps DeepSpeed's own clipping of its partitioned parameters.
    """
    return precision != "fp16" and zero_stage <= 2


def bf16_autocast(precision: str, zero_stage: int) -> bool:
    """Whether bf16 runs as torch.autocast over fp32 weights (ZeRO-0), not DeepSpeed's bf16 wrapper.

    The two keep different optimizer states, so a checkpoint records which one wrote it (the meta's
    "bf16_autocast"); those written before autocast was used here lack the key."""
    return precision == "bf16" and zero_stage == 0


def resolve_ds_config(ds: dict, optim: OptimSettings, plan: BatchPlan, precision: str, zero_stage: int,
                      load_universal: bool = False) -> dict:
    """The full DeepSpeed config for this run: the JSON's settings plus everything the run decides.

    The learning rate is set by the step runner before each step (`andy_dist.train.lr_schedule`), so
    DeepSpeed gets no scheduler.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    merged = copy.deepcopy(ds)
    merged["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    merged["gradient_accumulation_steps"] = plan.grad_accum
    merged["train_batch_size"] = plan.global_batch_size
    guarded = step_runner_guards(precision, zero_stage)
    merged["gradient_clipping"] = 0.0 if guarded else optim.grad_clip
    bf16 = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    if bf16_autocast(precision, zero_stage):
        # Without ZeRO, bf16 is torch.autocast over fp32 weights (the plain loop's AMP): DeepSpeed's bf16
        # wrapper would cast, scale and check every parameter one by one (2,004 ops per step against 707).
        bf16["enabled"] = False
        merged["torch_autocast"] = {**ds.get("torch_autocast", {}), "enabled": True, "dtype": "bfloat16"}
    if guarded:
        bf16["check_grad_overflow"] = False  # the runner's own check, on the device (see step_runner_guards)
    merged["bf16"] = bf16
    fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
            "min_loss_scale": 1}  # loss_scale 0 = dynamic loss scaling
    merged["fp16"] = {**fp16, **ds.get("fp16", {}), "enabled": precision == "fp16"}
    zero = {**ds.get("zero_optimization", {}), "stage": zero_stage}
    if guarded and zero_stage in (1, 2):
        zero["compute_grad_norm"] = False  # the runner computes the norm: 2 ops per group, not 2 per tensor
    merged["zero_optimization"] = zero
    merged["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": 1e-8, "weight_decay": optim.weight_decay,
                   # torch's fused AdamW, on CUDA and on CPU alike: the fastest AdamW on both (CPU, tiny: 5.7 ms
                   # per step against 14.5 for-loop and 23 foreach), and the only one that takes the runner's
                   # device-side clipping factor and skip flag. DeepSpeed's FusedAdam would be JIT-compiled with
                   # nvcc at the first launch (minutes, and a CUDA toolkit on every node) for no speed gain.
                   "torch_adam": True, "fused": True},
    }
    merged.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    merged.setdefault("wall_clock_breakdown", False)
    if load_universal:
        merged["checkpoint"] = {**merged.get("checkpoint", {}), "load_universal": True}
    return merged


def init_distributed(dist: DistEnv, timeout_s: int = 600) -> torch.device:
    """Start the process group for this launcher's environment; returns this rank's device.

    The timeout bounds how long a rank waits in a collective for a peer that died, so a lost
    rank ends the job instead of hanging it.
    """
    import deepspeed

    export(dist)
    if accelerator() == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device, backend = torch.device("cuda", dist.local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    mark_distributed_process()
    return device


def shutdown_distributed() -> None:
    """Leave the process group in step with the other ranks. Call only on an orderly finish.

    The barrier lets every rank finish its last collective before any rank tears its side down; the
    process then exits without interpreter teardown (`cli.run_tool`). After a crash this must not
    run: a barrier with a dead peer would hang.
    """
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorms and embeddings are not decayed (GPT-2 practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and not name.startswith("embed.") else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_config: dict, weight_decay: float):
    """deepspeed.initialize around the plain model; returns the engine (optimizer and schedule inside)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, weight_decay), config=ds_config)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Alone there is nothing to average, yet DeepSpeed would flatten, all-reduce and copy back every
        # gradient after each backward (79 ops per step of the medium model's 76 tensors; docs/performance.md).
        engine.enable_backward_allreduce = False
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights in fp32 on CPU, on rank 0 (None elsewhere). Every rank must call it.

    Under ZeRO-3 the parameters are partitioned, so they are gathered first.
    """
    import deepspeed
    import torch.distributed as torch_dist

    module = engine.module
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    params = list(module.parameters())
    gather = engine.zero_optimization_stage() == 3
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if gather else nullcontext()
    with context:
        if rank != 0:
            return None
        return {name: tensor.detach().float().cpu().clone() for name, tensor in module.state_dict().items()}


def compile_model(engine) -> None:
    """torch.compile the model inside the engine, in place (`nn.Module.compile` through `engine.compile()`):
    parameter names, hooks and checkpoints stay those of the eager model."""
    engine.compile()


# What the step runner reads from or sets on the engine between backward and step (andy_dist.train.step).


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's wrappers (ZeRO's optimizer steps it once per parameter group)."""
    return engine.basic_optimizer


def local_gradients(engine) -> tuple[list[torch.Tensor], bool]:
    """This rank's gradients after the last backward of a step and before `step()`, already averaged over
    ranks, and whether they are a partition (ZeRO 1-2: each rank holds a slice; the squares of the slices
    sum over ranks to the whole gradient's) or whole (ZeRO-0: every rank holds all of it)."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return [p.grad for p in engine.module.parameters() if p.grad is not None], False
    if stage in (1, 2):
        held = engine.optimizer.averaged_gradients  # DeepSpeed fills it at the accumulation boundary
        return [g for group in held.values() if group is not None for g in group
                if g is not None and not getattr(g, "_zero_padding", False)], True  # padding: as DeepSpeed's norm
    raise ValueError(f"ZeRO-{stage}: DeepSpeed clips and checks the gradient itself (see step_runner_guards)")


def deepspeed_grad_norm(engine):
    """The pre-clipping global norm DeepSpeed computed in the last step (ZeRO-3, fp16): a float, a tensor
    still on the device, or None."""
    return engine.get_global_grad_norm()


def deepspeed_skipped_steps(engine) -> int:
    """Steps DeepSpeed itself skipped (fp16 loss-scale overflows); kept in its checkpoints."""
    return int(engine.skipped_steps)
