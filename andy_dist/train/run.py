"""From command-line arguments to a running Trainer: resolve, check, build, resume, fit.

Everything that can be checked without starting the process group (config keys, model size,
batch maths, shards against tokenizer and vocabulary, precision on this device) is checked
first, so a mistake costs seconds, not a GPU allocation. `--dry-run` stops right there and
prints the resolved plan.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.train import checkpoint as ckpt
from andy_dist.cli import check_output_path
from andy_dist.config import (BatchPlan, ConfigError, ModelConfig, TrainConfig, load_train_config, model_config,
                              resolve_batch)
from andy_dist.train.distenv import DistEnv, accelerator, detect
from andy_dist.train.engine import ds_precision, load_ds_config, model_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an Andy-LLM model with DeepSpeed. Runs under deepspeed, torchrun, srun or plain python.",
        epilog="Further settings: --config FILE.yaml and key=value overrides (e.g. lr=1e-3 model.dropout=0.0).")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True,
                        help="DeepSpeed JSON (ds_configs/tiny.json, small.json, medium.json, single_gpu_8gb.json)")
    parser.add_argument("--data", help="shard folder written by tools/make_shards.py (shards/NAME)")
    parser.add_argument("--out", default="runs/default", help="run folder: checkpoints, metrics, samples")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", choices=["tiny", "small", "medium"], help="model size (default: from --ds_config)")
    parser.add_argument("--config", help="YAML file of training settings")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the copy inside --data)")
    parser.add_argument("--wandb", choices=["online", "offline", "disabled"])
    parser.add_argument("--dry-run", action="store_true",
                        help="print rank/world/micro-batch/accumulation/global-batch for this environment and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


@dataclass
class RunPlan:
    dist: DistEnv
    cfg: TrainConfig
    size: str
    model: ModelConfig
    batch: BatchPlan
    precision: str
    zero_stage: int
    ds: dict
    device: str
    requested_micro: int

    def describe(self) -> str:
        d, b = self.dist, self.batch
        return "\n".join([
            f"launcher        {d.launcher} (rank {d.rank} of {d.world_size}, local rank {d.local_rank}, "
            f"master {d.master_addr}:{d.master_port})",
            f"device          {self.device}",
            f"model           {self.size}: vocab {self.model.vocab_size}, d {self.model.d_model}, "
            f"{self.model.n_heads} heads, {self.model.n_layers} layers, activation checkpointing "
            f"{'on' if self.model.activation_checkpointing else 'off'}",
            f"precision       {self.precision}, ZeRO stage {self.zero_stage}",
            f"micro-batch     {b.micro_batch_size} sequences per rank"
            + (f" (lowered from {self.requested_micro} so the global batch fits the range)"
               if self.requested_micro != b.micro_batch_size else ""),
            f"accumulation    {b.grad_accum} micro-batches per step",
            f"global batch    {b.global_batch_size} sequences = {b.micro_batch_size} x {b.grad_accum} x {b.world_size} ranks",
        ])


def plan_run(args: argparse.Namespace, env=None) -> RunPlan:
    """Resolve the whole run from arguments and environment, without touching data or devices."""
    dist = detect(env)
    cfg = load_train_config(args.config, args.overrides, max_steps=args.max_steps, seed=args.seed, size=args.size,
                            wandb=args.wandb)
    ds, andy = load_ds_config(args.ds_config)
    size = model_size(args.ds_config, andy, cfg.size)
    precision = cfg.precision or ds_precision(ds)
    zero_stage = cfg.zero_stage if cfg.zero_stage is not None else int(ds.get("zero_optimization", {}).get("stage", 0))
    micro = cfg.micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"{args.ds_config} needs train_micro_batch_size_per_gpu (or set micro_batch_size=N)")
    batch = resolve_batch(size, dist.world_size, micro, cfg.global_batch_size)
    checkpointing = cfg.activation_checkpointing
    if checkpointing is None:
        checkpointing = bool(andy.get("activation_checkpointing", False))
    model = model_config(size, **{**cfg.model, "activation_checkpointing": checkpointing})
    if cfg.init_from:  # the shape of the weights training starts from
        from andy_dist.train.init_from import init_model_config

        model = init_model_config(cfg.init_from, model, cfg.model)
    device = f"cuda:{dist.local_rank}" if accelerator() == "cuda" else "cpu"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use precision=bf16 or precision=fp32")
    return RunPlan(dist, cfg, size, model, batch, precision, zero_stage, ds, device, micro)


def _tokenizer_for(args, data_dir: Path):
    from andy_dist.data.tokenizer import Tokenizer

    path = Path(args.tokenizer) if args.tokenizer else data_dir / "tokenizer.model"
    if not path.exists():
        hint = "" if args.tokenizer else " (shard sets made before make_shards copied the tokenizer have none)"
        raise UserError(f"no tokenizer at {path}{hint}; pass --tokenizer DIR/tokenizer.model (the one the shards "
                        f"were made with)")
    return Tokenizer.from_file(path)


def train(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value may come between options
    plan = plan_run(args)
    if args.dry_run:
        print(plan.describe())
        return 0
    if not args.data:
        raise UserError("--data shards/NAME is required (make shards with tools/make_shards.py)")
    check_output_path(args.out, "--out", directory=True)  # a bad --out costs seconds, not a process group

    from andy_dist.infer.export import verify_checkpoint_files
    from andy_dist.data.stream import TrainStream, ValStream, SeqLenSchedule, open_shards
    from andy_dist.train.engine import build_engine, init_distributed, resolve_ds_config, shutdown_distributed
    from andy_dist.train.flops import MfuMeter
    from andy_dist.train.init_from import initial_model
    from andy_dist.train.metrics import MetricsLogger
    from andy_dist.train.trainer import Trainer, TrainingStopped, TrainState

    cfg, dist = plan.cfg, plan.dist
    data_dir = Path(args.data)
    tokenizer = _tokenizer_for(args, data_dir)
    shards = open_shards(data_dir, tokenizer=tokenizer)
    if shards.vocab_size > plan.model.vocab_size:
        raise ConfigError(f"the shards use a {shards.vocab_size}-piece tokenizer but the {plan.size} model has "
                          f"vocab_size {plan.model.vocab_size}: set model.vocab_size={shards.vocab_size} or train "
                          f"the tokenizer with --vocab-size {plan.model.vocab_size}")

    device = torch.device(plan.device)
    init_distributed(dist, timeout_s=cfg.dist_timeout_s)
    if cfg.memory_cap_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_cap_gb * 2**30 / total), device)
    schedule = (SeqLenSchedule(start=cfg.seq_len_start, end=plan.model.max_seq_len, ramp_steps=cfg.seq_len_ramp_steps)
                if cfg.seq_len_start else None)
    stream = TrainStream(shards, rank=dist.rank, world_size=dist.world_size, micro_batch_size=plan.batch.micro_batch_size,
                         grad_accum=plan.batch.grad_accum, seed=cfg.seed, num_workers=cfg.num_workers,
                         seq_len_schedule=schedule, max_seq_len=plan.model.max_seq_len,
                         max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch, bucket_window=cfg.bucket_window)
    total_steps = cfg.max_steps or stream.steps_per_epoch * cfg.max_epochs

    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    resume_from, load_tag = None, None
    if args.resume:
        resume_from = ckpt.find_resume(ckpt_dir)
        if resume_from is None:
            print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from scratch", flush=True)
        elif resume_from.meta.get("model_config") != plan.model.to_dict():
            raise ConfigError(f"checkpoint {resume_from.path} was saved for model {resume_from.meta.get('model_config')}, "
                              f"but this run builds {plan.model.to_dict()}; use the same size and model.* settings")
        elif resume_from.meta.get("global_batch_size") != plan.batch.global_batch_size:
            raise ConfigError(f"checkpoint {resume_from.path} was trained with global batch "
                              f"{resume_from.meta.get('global_batch_size')}; this run resolves to "
                              f"{plan.batch.global_batch_size}: set global_batch_size={resume_from.meta.get('global_batch_size')}")
    if resume_from is not None:  # DeepSpeed unpickles with weights_only=False: vet the files first
        verify_checkpoint_files(resume_from.path)
    universal = resume_from is not None and ckpt.needs_universal(resume_from, dist.world_size)
    if universal:
        load_tag = ckpt.convert_to_universal(resume_from)

    ds_config = resolve_ds_config(plan.ds, cfg, plan.batch, cfg.lr_decay_steps or total_steps, plan.precision, plan.zero_stage,
                                  load_universal=universal)
    torch.manual_seed(cfg.seed)
    engine = build_engine(initial_model(plan.model, cfg.init_from, tokenizer), ds_config, cfg.weight_decay)
    state = TrainState()
    if resume_from is not None:
        ckpt.load(engine, resume_from, load_tag)
        state = TrainState(**resume_from.state)
        stream.load_state_dict(state.data)
        if dist.is_main:
            print(f"resumed from {resume_from.path} at step {state.step}"
                  f"{' (universal checkpoint, ' + str(resume_from.meta.get('world_size')) + ' -> ' + str(dist.world_size) + ' ranks)' if universal else ''}",
                  flush=True)

    run_meta = {"model_config": plan.model.to_dict(), "size": plan.size, "precision": plan.precision,
                "zero_stage": plan.zero_stage, "world_size": dist.world_size,
                "global_batch_size": plan.batch.global_batch_size, "tokenizer_sha256": tokenizer.sha256,
                "data": str(data_dir), "seed": cfg.seed}
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    full_config = {"train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                   "model": plan.model.to_dict(), "deepspeed": ds_config, "run": run_meta,
                   "data": {"dir": str(data_dir), "train_samples": shards.num_samples("train"),
                            "val_samples": shards.num_samples("val"), "steps_per_epoch": stream.steps_per_epoch}}
    logger = MetricsLogger(out, full_config, is_main=dist.is_main, wandb_mode=cfg.wandb, project=cfg.wandb_project,
                           entity=cfg.wandb_entity, run_name=cfg.run_name or out.name, tags=cfg.wandb_tags,
                           resume_id=state.wandb_run_id, total_steps=total_steps)
    state.wandb_run_id = logger.wandb_run_id
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]
    # Attention FLOPs grow with the sequence: count them at the longest sample the shards hold.
    longest = int(shards.lengths("train").max()) if shards.num_samples("train") else plan.model.max_seq_len
    mfu_meter = MfuMeter(plan.model, min(longest, plan.model.max_seq_len), device, dtype)
    trainer = Trainer(
        engine, stream, lambda: ValStream(shards, dist.rank, dist.world_size, micro_batch_size=plan.batch.micro_batch_size,
                                          max_seq_len=plan.model.max_seq_len),
        cfg, plan.model, dist, device, logger, ckpt_dir, run_meta, plan.precision, plan.zero_stage, state=state,
        sampler=(_make_sampler(cfg, plan.model, tokenizer, device) if dist.is_main else (lambda w, s: []))
        if cfg.sample_prompts else None,
        total_steps=total_steps, val_text_bytes=shards.text_bytes("val"),
        mfu_meter=mfu_meter)
    if dist.is_main:
        print(plan.describe(), flush=True)
        print(f"mfu             {mfu_meter.describe()}", flush=True)
        print(f"data            {shards.num_samples('train')} train samples, {stream.steps_per_epoch} steps per epoch; "
              f"{total_steps} steps planned", flush=True)
    try:
        trainer.fit()
    except TrainingStopped as stop:  # every rank stops at the same step, so the shutdown below is collective
        if dist.is_main:
            print(str(stop), file=sys.stderr, flush=True)
        shutdown_distributed()
        return stop.exit_code
    finally:
        logger.close()
    shutdown_distributed()
    if dist.is_main:
        best = f"{state.best_val_loss:.4f} at step {state.best_step}" if state.best_val_loss is not None else "n/a"
        print(f"done: step {state.step}, best validation loss {best}; checkpoints in {ckpt_dir}", flush=True)
    return 0


def _make_sampler(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer, device: torch.device):
    """Rank 0's sample generator: a plain fp32 copy of the model continues the configured prompts."""
    from andy_dist.infer.generate import SamplingConfig, generate
    from andy_dist.model import AndyLM

    sampling = SamplingConfig(temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, top_p=cfg.sample_top_p)
    holder: dict = {}

    def sample(weights: dict | None, step: int) -> list[dict]:
        if weights is None:
            return []
        if "model" not in holder:
            holder["model"] = AndyLM(model_cfg.replace(activation_checkpointing=False)).to(device).eval()
        model = holder["model"]
        model.load_state_dict(weights)
        prompts = [tokenizer.encode(p, bos=True) for p in cfg.sample_prompts]
        outputs = generate(model, prompts, max_new_tokens=cfg.sample_max_new_tokens, sampling=sampling,
                           seed=cfg.seed + step)
        return [{"prompt": p, "completion": tokenizer.decode(o), "temperature": sampling.temperature,
                 "top_k": sampling.top_k, "top_p": sampling.top_p} for p, o in zip(cfg.sample_prompts, outputs)]

    return sample
