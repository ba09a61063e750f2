"""From command-line arguments to a running Trainer, in named steps:

    plan_run           arguments + environment -> RunPlan (settings, size, batch maths, precision); no I/O
    open_data          tokenizer and shards, checked against the model -> the training and validation streams
    find_resume_point  --resume -> the vetted checkpoint to continue from (converted when the ranks changed)
    build_engine       the model inside the DeepSpeed engine, loaded from that checkpoint
    build_trainer      logger, MFU meter, training samples -> the Trainer
    fit_and_shut_down  train, leave the process group in step, say how it ended

Everything that can be checked without starting the process group (config keys, model size, batch
maths, shards against tokenizer and vocabulary, precision on this device) is checked first, so a
mistake costs seconds, not a GPU allocation. `--dry-run` stops right after the plan and prints it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.cli import check_output_path
from andy_dist.config import BatchPlan, ConfigError, ModelConfig, model_config, resolve_batch
from andy_dist.data import shard_format
from andy_dist.data.batch_plan import SeqLenSchedule
from andy_dist.data.remote import FetchPolicy, parse_storage_options
from andy_dist.data.shard_cache import DataAccess, ShardFiles
from andy_dist.data.shard_reader import ShardSet, open_shards
from andy_dist.data.stream import TrainStream, ValStream
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.sweep.trial_hook import trial_evaluation_hook
from andy_dist.train import checkpoint as ckpt
from andy_dist.train import engine as ds_engine
from andy_dist.train.build_lock import watch_build_locks
from andy_dist.train.checkpoint_format import TOKENIZER_FILE, verify_checkpoint_files
from andy_dist.train.distenv import DistEnv, accelerator, detect
from andy_dist.train.faults import FaultHooks
from andy_dist.train.flops import MfuMeter
from andy_dist.train.init_from import init_model_config, initial_model
from andy_dist.train.lr_schedule import LrSchedule
from andy_dist.train.metrics import MetricsLogger
from andy_dist.train.nonfatal import nonfatal
from andy_dist.train.samples import TrainingSamples
from andy_dist.train.settings import TrainConfig, load_train_config
from andy_dist.train.step import StepRunner
from andy_dist.train.trainer import Checkpoints, Monitor, TrainData, Trainer, TrainingStopped, TrainState
from andy_dist.train.watchdog import StallReporter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an Andy-LLM model with DeepSpeed. Runs under deepspeed, torchrun, srun or plain python.",
        epilog="Further settings: --config FILE.yaml and key=value overrides (e.g. lr=1e-3 model.dropout=0.0).")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True,
                        help="DeepSpeed JSON (ds_configs/tiny.json, small.json, medium.json, single_gpu_8gb.json)")
    parser.add_argument("--data", help="shard set written by tools/make_shards.py: a folder (shards/NAME) or a URL "
                                       "(https://..., s3://bucket/prefix, any fsspec protocol)")
    parser.add_argument("--storage-options", help="JSON object of fsspec options for a --data URL, e.g. "
                                                  "'{\"endpoint_url\": \"http://host:9000\"}' (keep secrets in "
                                                  "AWS_* variables: the command line is visible to others)")
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
    # Set by the deepspeed launcher.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
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
    activation_checkpointing: bool
    ds: dict
    device: str
    requested_micro: int
    compile: bool = False

    def describe(self) -> str:
        d, b = self.dist, self.batch
        return "\n".join([
            f"launcher        {d.launcher} (rank {d.rank} of {d.world_size}, local rank {d.local_rank}, "
            f"master {d.master_addr}:{d.master_port})",
            f"device          {self.device}",
            f"model           {self.size}: vocab {self.model.vocab_size}, d {self.model.d_model}, "
            f"{self.model.n_heads} heads, {self.model.n_layers} layers, activation checkpointing "
            f"{'on' if self.activation_checkpointing else 'off'}",
            f"precision       {self.precision}, ZeRO stage {self.zero_stage}, torch.compile "
            f"{'on' if self.compile else 'off'}",
            f"micro-batch     {b.micro_batch_size} sequences per rank"
            + (f" (lowered from {self.requested_micro} so the global batch fits the range)"
               if self.requested_micro != b.micro_batch_size else ""),
            f"accumulation    {b.grad_accum} micro-batches per step",
            f"global batch    {b.global_batch_size} sequences = {b.micro_batch_size} x {b.grad_accum} x "
            f"{b.world_size} ranks",
        ])


def plan_run(args: argparse.Namespace, env=None) -> RunPlan:
    """Resolve the whole run from arguments and environment, without touching data or devices."""
    dist = detect(env)
    cfg = load_train_config(args.config, args.overrides, max_steps=args.max_steps, seed=args.seed, size=args.size,
                            wandb=args.wandb)
    ds, andy = ds_engine.load_ds_config(args.ds_config)
    size = ds_engine.model_size(args.ds_config, andy, cfg.size)
    engine_cfg = cfg.engine
    precision = engine_cfg.precision or ds_engine.ds_precision(ds)
    zero_stage = (engine_cfg.zero_stage if engine_cfg.zero_stage is not None
                  else int(ds.get("zero_optimization", {}).get("stage", 0)))
    micro = cfg.data.micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"{args.ds_config} needs train_micro_batch_size_per_gpu (or set micro_batch_size=N)")
    batch = resolve_batch(size, dist.world_size, micro, cfg.data.global_batch_size)
    checkpointing = engine_cfg.activation_checkpointing
    if checkpointing is None:
        checkpointing = bool(andy.get("activation_checkpointing", False))
    device = f"cuda:{dist.local_rank}" if accelerator() == "cuda" else "cpu"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use precision=bf16 or precision=fp32")
    compiled = engine_cfg.compile if engine_cfg.compile is not None else bool(andy.get("compile", False))
    model = model_config(size, **cfg.model)
    if cfg.init_from:  # the shape of the weights training starts from
        model = init_model_config(cfg.init_from, model, cfg.model)
    return RunPlan(dist, cfg, size, model, batch, precision, zero_stage, checkpointing, ds, device, micro, compiled)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class RunData:
    tokenizer: Tokenizer
    shards: ShardSet
    stream: TrainStream
    total_steps: int

    def val_stream(self, plan: RunPlan) -> ValStream:
        return ValStream(self.shards, plan.dist.rank, plan.dist.world_size,
                         micro_batch_size=plan.batch.micro_batch_size, max_seq_len=plan.model.max_seq_len)


def _tokenizer_for(tokenizer_arg: str | None, files: ShardFiles) -> Tokenizer:
    path = Path(tokenizer_arg) if tokenizer_arg else files.optional(shard_format.TOKENIZER_FILE)
    if path is None or not path.exists():
        hint = "" if tokenizer_arg else " (shard sets made before make_shards copied the tokenizer have none)"
        where = path or files.describe(shard_format.TOKENIZER_FILE)
        raise UserError(f"no tokenizer at {where}{hint}; pass --tokenizer DIR/tokenizer.model (the one the shards "
                        f"were made with)")
    return Tokenizer.from_file(path)


def data_access(plan: RunPlan, storage_options: dict | None = None) -> DataAccess:
    """How this rank reaches the shards; local rank 0 of each node fetches (or verifies) ahead of the others."""
    data = plan.cfg.data
    return DataAccess(cache_dir=data.cache_dir, storage_options=storage_options or {},
                      max_bytes=int(data.cache_max_gb * 2**30) if data.cache_max_gb else None,
                      policy=FetchPolicy(data.fetch_retries, data.fetch_backoff_s),
                      prefetch_shards=data.prefetch_shards, prefetch=plan.dist.local_rank == 0)


def open_data(data_arg: str, tokenizer_arg: str | None, plan: RunPlan, storage_options: dict | None = None) -> RunData:
    """The tokenizer and the shards, checked against each other and the model; this rank's training stream."""
    access = data_access(plan, storage_options)
    files = ShardFiles(data_arg, access, plan.cfg.data.data_verify)
    tokenizer = _tokenizer_for(tokenizer_arg, files)
    shards = open_shards(files, tokenizer=tokenizer, verify=plan.cfg.data.data_verify, access=access)
    if shards.vocab_size > plan.model.vocab_size:
        raise ConfigError(f"the shards use a {shards.vocab_size}-piece tokenizer but the {plan.size} model has "
                          f"vocab_size {plan.model.vocab_size}: set model.vocab_size={shards.vocab_size} or train "
                          f"the tokenizer with --vocab-size {plan.model.vocab_size}")
    data, dist = plan.cfg.data, plan.dist
    schedule = (SeqLenSchedule(start=data.seq_len_start, end=plan.model.max_seq_len, ramp_steps=data.seq_len_ramp_steps)
                if data.seq_len_start else None)
    stream = TrainStream(shards, rank=dist.rank, world_size=dist.world_size,
                         micro_batch_size=plan.batch.micro_batch_size, grad_accum=plan.batch.grad_accum,
                         seed=plan.cfg.seed, num_workers=data.num_workers, seq_len_schedule=schedule,
                         max_seq_len=plan.model.max_seq_len, bucket_window=data.bucket_window)
    loop = plan.cfg.loop
    return RunData(tokenizer, shards, stream, loop.max_steps or stream.steps_per_epoch * loop.max_epochs)


# ---------------------------------------------------------------------------------------------
# Resume point and engine


@dataclass
class ResumePoint:
    checkpoint: ckpt.Checkpoint
    load_tag: str | None  # the universal conversion's tag when the number of ranks changed
    universal: bool


def find_resume_point(resume: bool, ckpt_dir: Path, plan: RunPlan) -> ResumePoint | None:
    """The checkpoint to continue from, checked against this run and vetted before DeepSpeed unpickles it."""
    if not resume:
        return None
    found = ckpt.find_resume(ckpt_dir)
    if found is None:
        print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from scratch", flush=True)
        return None
    saved = found.meta.get("model_config")
    saved_cfg = ModelConfig.from_dict(saved) if isinstance(saved, dict) else None
    if saved_cfg is not None and saved_cfg == plan.model.replace(vocab_pad_multiple=saved_cfg.vocab_pad_multiple):
        plan.model = saved_cfg  # the padded rows are the checkpoint's (none before padding existed), not a choice
    if saved_cfg != plan.model:
        raise ConfigError(f"checkpoint {found.path} was saved for model {found.meta.get('model_config')}, "
                          f"but this run builds {plan.model.to_dict()}; use the same size and model.* settings")
    if found.meta.get("global_batch_size") != plan.batch.global_batch_size:
        saved_batch = found.meta.get("global_batch_size")
        raise ConfigError(f"checkpoint {found.path} was trained with global batch {saved_batch}; this run "
                          f"resolves to {plan.batch.global_batch_size}: set global_batch_size={saved_batch}")
    _check_optimizer_layout(found, plan)
    verify_checkpoint_files(found.path)  # DeepSpeed unpickles with weights_only=False: vet the files first
    universal = ckpt.needs_universal(found, plan.dist.world_size)
    load_tag = ckpt.convert_to_universal(found) if universal else None
    return ResumePoint(found, load_tag, universal)


def _check_optimizer_layout(found: ckpt.Checkpoint, plan: RunPlan) -> None:
    """A ZeRO-0 bf16 checkpoint written by DeepSpeed's bf16 wrapper (before this trainer ran ZeRO-0 bf16 as
    autocast) holds an optimizer state the autocast engine cannot load: say so and how to go on, before
    DeepSpeed fails on a missing key."""
    meta = found.meta
    wrapper = meta.get("precision") == "bf16" and meta.get("zero_stage") == 0 and not meta.get("bf16_autocast")
    if wrapper and ds_engine.bf16_autocast(plan.precision, plan.zero_stage):
        raise ConfigError(f"checkpoint {found.path} was written by DeepSpeed's bf16 optimizer wrapper (ZeRO-0 bf16 "
                          f"before andy_dist trained it as autocast over fp32 weights); its optimizer state cannot "
                          f"be resumed. Export its weights (andy-export --fp32 {found.dir} --tag {found.tag} -o "
                          f"model.andy) and start a new run from them with init_from=model.andy")


def build_engine(plan: RunPlan, data: RunData, resume: ResumePoint | None, faults: FaultHooks):
    """The model inside the DeepSpeed engine, and the trainer's state (both from the checkpoint on a resume)."""
    cfg = plan.cfg
    ds_config = ds_engine.resolve_ds_config(plan.ds, cfg.optim, plan.batch, plan.precision, plan.zero_stage,
                                            load_universal=resume is not None and resume.universal)
    torch.manual_seed(cfg.seed)
    model = initial_model(plan.model, cfg.init_from, data.tokenizer, plan.activation_checkpointing)
    faults.install(model)
    engine = ds_engine.build_engine(model, ds_config, cfg.optim.weight_decay)
    if plan.compile:
        ds_engine.compile_model(engine)
    if resume is None:
        return engine, TrainState(), ds_config
    ckpt.load(engine, resume.checkpoint, resume.load_tag)
    state = TrainState(**resume.checkpoint.state)
    data.stream.load_state_dict(state.data)
    if plan.dist.is_main:
        saved_world = resume.checkpoint.meta.get("world_size")
        how = f" (universal checkpoint, {saved_world} -> {plan.dist.world_size} ranks)" if resume.universal else ""
        print(f"resumed from {resume.checkpoint.path} at step {state.step}{how}", flush=True)
    return engine, state, ds_config


# ---------------------------------------------------------------------------------------------
# Trainer


def build_trainer(plan: RunPlan, data: RunData, engine, state: TrainState, ds_config: dict, out: Path,
                  faults: FaultHooks) -> Trainer:
    """Logger, MFU meter and training samples around the engine; the run's files in `out`."""
    cfg, dist, device = plan.cfg, plan.dist, torch.device(plan.device)
    ckpt_dir = out / "checkpoints"
    run_meta = {"model_config": plan.model.to_dict(), "size": plan.size, "precision": plan.precision,
                "zero_stage": plan.zero_stage, "world_size": dist.world_size,
                "global_batch_size": plan.batch.global_batch_size, "tokenizer_sha256": data.tokenizer.sha256,
                "data": data.shards.location, "seed": cfg.seed,
                "optimizer_param_groups": optimizer_param_groups(engine.module, cfg.optim.weight_decay),
                "bf16_autocast": ds_engine.bf16_autocast(plan.precision, plan.zero_stage)}
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / TOKENIZER_FILE).write_bytes(data.tokenizer.model_bytes)
    full_config = {"train": cfg.flat(), "model": plan.model.to_dict(), "deepspeed": ds_config, "run": run_meta,
                   "data": {"dir": data.shards.location, "train_samples": data.shards.num_samples("train"),
                            "val_samples": data.shards.num_samples("val"),
                            "steps_per_epoch": data.stream.steps_per_epoch}}
    log = cfg.logging
    logger = MetricsLogger(out, full_config, is_main=dist.is_main, wandb_mode=log.wandb, project=log.wandb_project,
                           entity=log.wandb_entity, run_name=log.run_name or out.name, tags=log.wandb_tags,
                           group=log.wandb_group, resume_id=state.wandb_run_id, total_steps=data.total_steps)
    state.wandb_run_id = logger.wandb_run_id
    # FLOPs are counted per step, each sample at its own length (attention grows with it).
    mfu_meter = MfuMeter(plan.model, None, device, DTYPES[plan.precision])
    samples = (TrainingSamples(cfg.samples, plan.model, data.tokenizer, device, cfg.seed)
               if cfg.samples.prompts else None)
    monitor = Monitor(logger, mfu_meter, samples, log_interval=log.log_interval,
                      sample_interval=cfg.samples.interval, stall_report_s=cfg.engine.stall_report_s,
                      on_evaluation=trial_evaluation_hook(dist.is_main))
    schedule = LrSchedule(cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.lr_decay_steps or data.total_steps,
                          cfg.schedule.min_lr_ratio)
    step = StepRunner(engine, dist, device, plan.precision, plan.zero_stage, seed=cfg.seed, lr_schedule=schedule,
                      max_grad_norm=cfg.optim.grad_clip)
    trainer_data = TrainData(data.stream, lambda: data.val_stream(plan), data.total_steps,
                             val_text_bytes=data.shards.text_bytes("val"))
    trainer = Trainer(step, trainer_data, cfg.loop, monitor, Checkpoints(ckpt_dir, run_meta), state=state,
                      faults=faults)
    if dist.is_main:
        print(plan.describe(), flush=True)
        print(f"mfu             {mfu_meter.describe()}", flush=True)
        print(f"data            {data.shards.num_samples('train')} train samples, {data.stream.steps_per_epoch} "
              f"steps per epoch; {data.total_steps} steps planned", flush=True)
    return trainer


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[list[str]]:
    """The parameter names of each optimizer group, in the optimizer's order. Without ZeRO, DeepSpeed saves the
    fp32 master weights of bf16/fp16 training per group, without names; export matches them by this list."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]]
            for group in ds_engine.parameter_groups(model, weight_decay)]


def fit_and_shut_down(trainer: Trainer, plan: RunPlan) -> int:
    """Train; then every rank leaves the process group in step. Returns the exit status."""
    is_main = plan.dist.is_main
    try:
        state = trainer.fit()
    except TrainingStopped as stop:  # every rank stops at the same step, so the shutdown below is collective
        if is_main:
            print(str(stop), file=sys.stderr, flush=True)
        ds_engine.shutdown_distributed()
        return stop.exit_code
    finally:
        with nonfatal("closing the metrics logger (W&B, metrics.jsonl)"):
            trainer.monitor.logger.close()
    ds_engine.shutdown_distributed()
    if is_main:
        best = f"{state.best_val_loss:.4f} at step {state.best_step}" if state.best_val_loss is not None else "n/a"
        print(f"done: step {state.step}, best validation loss {best}; checkpoints in "
              f"{trainer.checkpoints.directory}", flush=True)
    return 0


def _cap_cuda_memory(plan: RunPlan) -> None:
    """memory_cap_gb: make this process behave like a smaller card (to prove a config fits one)."""
    cap, device = plan.cfg.engine.memory_cap_gb, torch.device(plan.device)
    if cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)


def train(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value may come between options
    plan = plan_run(args)
    if args.dry_run:
        print(plan.describe())
        return 0
    if not args.data:
        raise UserError("--data shards/NAME is required (make shards with tools/make_shards.py)")
    out = check_output_path(args.out, "--out", directory=True)  # a bad --out costs seconds, not a process group
    storage_options = parse_storage_options(args.storage_options)
    # From here on anything may block (a download, the rendezvous, a build lock, a peer): a stall is reported.
    with StallReporter(plan.cfg.engine.stall_report_s, plan.dist.rank) as watchdog:
        data = open_data(args.data, args.tokenizer, plan, storage_options)
        watchdog.progress("data opened; starting the process group")
        with watch_build_locks():  # DeepSpeed may build its communication op here: a stale lock would hang it
            ds_engine.init_distributed(plan.dist, timeout_s=plan.cfg.engine.dist_timeout_s)
        watchdog.progress("process group started; finding the checkpoint")
        _cap_cuda_memory(plan)
        faults = FaultHooks.from_env(plan.dist.rank)
        resume = find_resume_point(args.resume, out / "checkpoints", plan)
        watchdog.progress("checkpoint found; building the engine")
        engine, state, ds_config = build_engine(plan, data, resume, faults)
        watchdog.progress("engine built; setting up the trainer")
        trainer = build_trainer(plan, data, engine, state, ds_config, out, faults)
    return fit_and_shut_down(trainer, plan)
