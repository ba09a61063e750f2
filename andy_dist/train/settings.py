"""Training settings, grouped by concern, read from YAML and `key=value`, every check in one place.

Each component is handed its own group, not the whole run. On the command line and in YAML a setting
goes by its flat name (`lr=1e-3`, `sample_prompts=[...]`, as always) or by its group
(`optim.lr=1e-3`, or a YAML mapping `optim: {lr: 1e-3}`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from andy_dist.config import MAX_SEQ_LEN, PRECISIONS, SIZES, ConfigError, ModelConfig

DATA_VERIFY = ("size", "once", "sha256", "full")  # andy_dist.data.shard_cache.VERIFY_LEVELS, without importing it


@dataclass
class OptimSettings:
    """AdamW and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (matrices only; biases, LayerNorms and embeddings are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""


@dataclass
class ScheduleSettings:
    """The learning-rate schedule: linear warmup, then cosine decay."""

    warmup_steps: int = 1000
    """Linear warmup over this many optimizer steps: step k of it trains at lr * k / warmup_steps (so the first
    step already learns); 0: no warmup, the cosine starts at step 1."""
    lr_decay_steps: int | None = None
    """Length of the schedule (warmup + cosine); default max_steps, else max_epochs x steps per epoch.
    Set it when a run will be extended or stopped early, so the schedule does not depend on where it stops."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""


@dataclass
class DataSettings:
    """How the shards become micro-batches."""

    micro_batch_size: int | None = None
    """Sequences per rank per forward pass; default from the ds_config's train_micro_batch_size_per_gpu."""
    global_batch_size: int | None = None
    """Sequences per optimizer step; default: the smallest multiple of micro x ranks in the size's range."""
    bucket_window: int = 1
    """Sort samples by length across this many global batches before cutting micro-batches: padding
    falls (about 39% -> 5% on short-document corpora at 16) at the cost of steps holding similar lengths."""
    seq_len_start: int | None = None
    """Start training with samples capped at this many tokens (None: no schedule, full length)."""
    seq_len_ramp_steps: int = 0
    """Grow the cap linearly from seq_len_start to max_seq_len over this many steps."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    data_verify: str = "once"
    """What is checked before a shard is read: size (the manifest and sizes only), once (also each shard's sha256,
    once per node before its first read, remembered by size and mtime: start-up does not read the dataset),
    sha256 (every shard hashed at every start), full (also every block decoded at every start, on every rank)."""
    cache_dir: str | None = None
    """Node-local folder for copies of remote shards (--data URL) and verification records; default
    $ANDY_CACHE_DIR, else ~/.cache/andy_dist."""
    cache_max_gb: float | None = None
    """Size limit of the node's copies of one remote shard set: shards the epoch has passed are deleted to stay
    under it (null: no limit; later epochs then read from the cache)."""
    prefetch_shards: int = 4
    """Shards fetched (or verified) ahead of the read position, by local rank 0 of each node."""
    fetch_retries: int = 5
    """Attempts to fetch a remote file before the run stops (connection errors, cut transfers; a 404 or missing
    credentials stop at once)."""
    fetch_backoff_s: float = 2.0
    """Wait after the first failed fetch, doubled after each further one (at most 60 s)."""


@dataclass
class LoopSettings:
    """How long to train, when to validate, save and stop."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run max_epochs)."""
    max_epochs: int = 1
    """Stop after this many passes over the training split, unless max_steps comes first."""
    eval_interval: int | None = None
    """Also validate every this many steps (validation always runs at the end of each epoch)."""
    save_interval: int = 500
    """Write a checkpoint every this many steps (and at the end, and on SIGTERM)."""
    keep_last: int = 3
    """Keep this many most recent step checkpoints (the best one is kept separately)."""
    patience: int = 3
    """Stop after this many evaluations in a row without improving the best validation loss."""
    min_delta: float = 0.0
    """An evaluation improves only if it beats the best by more than this."""
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row skipped for a non-finite loss."""


@dataclass
class EngineSettings:
    """Numerics, memory and the process group."""

    precision: str | None = None
    """bf16, fp16 or fp32; default from the ds_config."""
    zero_stage: int | None = None
    """ZeRO stage 0-3; default from the ds_config."""
    activation_checkpointing: bool | None = None
    """Recompute block activations in backward; default from the ds_config's "andy" section."""
    compile: bool | None = None
    """torch.compile the model inside the engine (Inductor; works with ZeRO 0-3 and activation checkpointing);
    default from the ds_config's "andy" section, off in every shipped one until measured on a GPU
    (scripts/gpu_checks.sh). The first step pays the compilation; docs/performance.md has the figures."""
    memory_cap_gb: float | None = None
    """Cap this process's CUDA memory (e.g. 8 to prove a config fits an 8 GB card on a bigger one)."""
    dist_timeout_s: int = 600
    """How long a rank waits in a collective for a peer before the job fails (the process-group timeout)."""
    stall_report_s: float | None = 300.0
    """When a rank finishes no step, evaluation or checkpoint for this long, it prints every thread's
    stack to stderr (once per stall) so a hang shows where it is; null: off."""


@dataclass
class SampleSettings:
    """Text the model writes during training (flat names carry a `sample_` prefix: sample_prompts=...)."""

    interval: int | None = None
    """Generate samples every this many steps (always at each evaluation when prompts are set)."""
    prompts: tuple[str, ...] = ("The ", "def main():", "First Citizen:")
    """Prompts the model continues during training; empty to turn samples off."""
    max_new_tokens: int = 48
    """Length of each generated sample."""
    temperature: float = 0.8
    """Sampler settings for the training samples."""
    top_k: int = 50
    top_p: float = 0.95


@dataclass
class LoggingSettings:
    """Console, metrics files and W&B."""

    log_interval: int = 10
    """Log training figures every this many steps."""
    wandb: str | None = None
    """online, offline or disabled; default online when logged in, else offline."""
    wandb_project: str = "andy-llm"
    wandb_entity: str | None = None
    wandb_tags: tuple[str, ...] = ()
    wandb_group: str | None = None
    """W&B run group, e.g. every trial of one hyper-parameter search (tools/sweep.py sets the study's name)."""
    run_name: str | None = None
    """Name of the run (W&B and logs); default: the --out folder's name."""


GROUPS: dict[str, type] = {"optim": OptimSettings, "schedule": ScheduleSettings, "data": DataSettings,
                           "loop": LoopSettings, "engine": EngineSettings, "samples": SampleSettings,
                           "logging": LoggingSettings}
_FLAT_PREFIX = {"samples": "sample_"}


def _flat_names() -> dict[str, tuple[str, str]]:
    """flat key (what users type) -> (group, field)."""
    return {_FLAT_PREFIX.get(group, "") + f.name: (group, f.name) for group, cls in GROUPS.items() for f in fields(cls)}


FLAT_NAMES = _flat_names()

# Settings that were removed, with what to do instead (a config that still sets one gets this line).
REMOVED: dict[str, str] = {
    "max_tokens_per_micro_batch": (
        "max_tokens_per_micro_batch was removed: with DeepSpeed's fixed number of micro-batches per step it "
        "could never bind. Micro-batches are now always cut to the smallest largest padded size (short rows "
        "share one in greater numbers); to use less memory per forward pass lower micro_batch_size"),
}


@dataclass
class TrainConfig:
    """Everything the trainer needs beyond the DeepSpeed JSON. Set from YAML (`--config`) and `key=value`."""

    size: str | None = None
    """Model size (tiny/small/medium); by default the ds_config's name or its "andy": {"size"} entry."""
    seed: int = 1234
    """Seeds the model init, the data order and dropout (dropout is re-seeded from (seed, step, rank))."""
    model: dict = field(default_factory=dict)
    """Overrides of ModelConfig fields, e.g. model.vocab_size=2000 or model.dropout=0.0."""
    init_from: str | None = None
    """Start from these weights instead of a random init: a float .andy file or a Hugging Face GPT-2 directory
    (tools/import_hf.py). The model's shape comes from them; dropout and activation checkpointing from the run."""
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    data: DataSettings = field(default_factory=DataSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    samples: SampleSettings = field(default_factory=SampleSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat name (lists for tuples): what W&B and the report show, and what
        `--config` reads back."""
        values: dict[str, Any] = {"size": self.size, "seed": self.seed, "model": dict(self.model),
                                  "init_from": self.init_from}
        for flat_name, (group, name) in FLAT_NAMES.items():
            value = getattr(getattr(self, group), name)
            values[flat_name] = list(value) if isinstance(value, tuple) else value
        return values

    def check(self) -> None:
        """Every check on the training settings; a message names the setting as the user typed it."""
        o, s, d, lp, e, lg = self.optim, self.schedule, self.data, self.loop, self.engine, self.logging
        positive = {"max_epochs": lp.max_epochs, "lr": o.lr, "log_interval": lg.log_interval,
                    "save_interval": lp.save_interval, "keep_last": lp.keep_last, "patience": lp.patience,
                    "max_bad_steps": lp.max_bad_steps, "sample_max_new_tokens": self.samples.max_new_tokens}
        for name, value in positive.items():
            if value is None or value < 1e-12:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if s.warmup_steps is None or s.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be 0 or more, got {s.warmup_steps!r}")
        optional = {"max_steps": lp.max_steps, "lr_decay_steps": s.lr_decay_steps,
                    "micro_batch_size": d.micro_batch_size, "global_batch_size": d.global_batch_size,
                    "eval_interval": lp.eval_interval, "sample_interval": self.samples.interval,
                    "seq_len_start": d.seq_len_start}
        for name, value in optional.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer or unset, got {value!r}")
        choices = {"size": (self.size, tuple(sorted(SIZES))), "precision": (e.precision, PRECISIONS),
                   "wandb": (lg.wandb, ("online", "offline", "disabled"))}
        for name, (value, allowed) in choices.items():
            if value is not None and value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if e.zero_stage is not None and e.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {e.zero_stage!r}")
        if not 0.0 <= s.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {o.betas!r}")
        if d.seq_len_start is not None and d.seq_len_start > MAX_SEQ_LEN:
            raise ConfigError(f"seq_len_start={d.seq_len_start} exceeds the maximum {MAX_SEQ_LEN}")
        if d.bucket_window < 1:
            raise ConfigError(f"bucket_window must be >= 1, got {d.bucket_window}")
        if d.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {d.num_workers}")
        self._check_data_access()
        if e.stall_report_s is not None and e.stall_report_s <= 0:
            raise ConfigError(f"stall_report_s must be positive or null (off), got {e.stall_report_s}")
        if e.dist_timeout_s < 1:
            raise ConfigError(f"dist_timeout_s must be at least 1 second, got {e.dist_timeout_s}")
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ConfigError(f"unknown model keys {['model.' + k for k in unknown]}; known: {sorted(known)}")

    def _check_data_access(self) -> None:
        d = self.data
        if d.data_verify not in DATA_VERIFY:
            raise ConfigError(f"data_verify must be one of {list(DATA_VERIFY)}, got {d.data_verify!r}")
        if d.cache_max_gb is not None and d.cache_max_gb <= 0:
            raise ConfigError(f"cache_max_gb must be positive or null (no limit), got {d.cache_max_gb}")
        if d.prefetch_shards < 0 or d.fetch_retries < 1 or d.fetch_backoff_s < 0:
            raise ConfigError(f"prefetch_shards must be >= 0, fetch_retries >= 1 and fetch_backoff_s >= 0, got "
                              f"{d.prefetch_shards}, {d.fetch_retries} and {d.fetch_backoff_s}")


def _parse_value(text: str) -> Any:
    """`key=value` values are read as YAML scalars/lists: 3e-4, true, [a, b], null."""
    import yaml

    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """`value` as the type the field is annotated with, or a ConfigError naming the field."""
    if value is None:
        return None
    if "tuple" in annotation:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if "bool" in annotation and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if "float" in annotation and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if "int" in annotation and "float" not in annotation and not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if "str" in annotation and not isinstance(value, str) and "int" not in annotation:
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _read_yaml(yaml_path: str) -> dict:
    import yaml

    try:
        with open(yaml_path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {yaml_path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {yaml_path} is a directory; pass a .yaml file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {yaml_path} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())  # YAML errors span lines; the tool prints one
        raise ConfigError(f"config file {yaml_path} is not valid YAML: {first}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {yaml_path} must hold a mapping of keys to values")
    return loaded


def _flatten_groups(values: dict) -> dict:
    """YAML may nest settings under their group (`optim: {lr: ...}`): bring them to their flat names."""
    flat: dict[str, Any] = {}
    by_group = {(group, name): flat_name for flat_name, (group, name) in FLAT_NAMES.items()}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, dict):
            for name, inner in value.items():
                if (key, name) not in by_group:
                    if name in REMOVED:
                        raise ConfigError(REMOVED[name])
                    raise ConfigError(f"unknown config key {key}.{name}; known in {key}: "
                                      f"{[f.name for f in fields(GROUPS[key])]}")
                flat[by_group[(key, name)]] = inner
        else:
            flat[key] = value
    return flat


def load_train_config(yaml_path: str | None = None, overrides: list[str] = (), **explicit: Any) -> TrainConfig:
    """YAML file, then `key=value` overrides, then explicit keyword values (from CLI flags), all checked."""
    values: dict[str, Any] = _flatten_groups(_read_yaml(yaml_path)) if yaml_path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        group, _, name = key.partition(".")
        if group == "model" and name:
            values["model"] = {**values.get("model", {}), name: _parse_value(text)}
        else:
            values.update(_flatten_groups({group: {name: _parse_value(text)}} if name else {key: _parse_value(text)}))
    values.update({k: v for k, v in explicit.items() if v is not None})
    removed = sorted(set(values) & set(REMOVED))
    if removed:
        raise ConfigError(REMOVED[removed[0]])
    top = {"size": "str | None", "seed": "int", "init_from": "str | None"}
    unknown = sorted(set(values) - set(FLAT_NAMES) - set(top) - {"model"})
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted([*FLAT_NAMES, *top, 'model'])}")
    if not isinstance(values.get("model", {}), dict):
        raise ConfigError("model must be a mapping of ModelConfig fields")
    cfg = TrainConfig(**{k: v for k, v in values.items() if k == "model"},
                      **{k: _coerce(k, values[k], top[k]) for k in top if k in values})
    annotations = {group: {f.name: str(f.type) for f in fields(cls)} for group, cls in GROUPS.items()}
    for flat_name, value in values.items():
        if flat_name in FLAT_NAMES:
            group, name = FLAT_NAMES[flat_name]
            setattr(getattr(cfg, group), name, _coerce(flat_name, value, annotations[group][name]))
    cfg.check()
    return cfg


