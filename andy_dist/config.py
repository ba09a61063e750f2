"""Model sizes and configuration checks.

Every check on a configuration lives here, so a bad value fails in one place with a message that
names the field. Each component receives only the config it needs (the model gets a
`ModelConfig`, never the whole run configuration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from andy_dist import UserError

MAX_SEQ_LEN = 512
POSITION_TABLES = ("sinusoidal", "stored")
ACTIVATIONS = ("gelu", "gelu_tanh")
# ModelConfig fields added after checkpoints and model files were first written, with their defaults.
_LATER_FIELDS = {"position_table": "sinusoidal", "activation": "gelu"}


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an Andy-LLM decoder-only Transformer."""

    vocab_size: int
    """Number of token ids, special ids (PAD 0, UNK 1, BOS 2, EOS 3) included."""
    d_model: int
    """Width of the residual stream and of the sinusoidal position encoding."""
    n_heads: int
    """Attention heads per layer; must divide d_model."""
    n_layers: int
    """Number of Transformer blocks."""
    max_seq_len: int = MAX_SEQ_LEN
    """Longest sequence (prompt + generated tokens) the model accepts."""
    ffn_mult: int = 4
    """Feed-forward hidden width as a multiple of d_model."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and residual branches during training."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head. Off by default: see README (parameter counts)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    position_table: str = "sinusoidal"
    """Where position vectors come from. "sinusoidal": computed from the shape, never saved. "stored": a fixed
    (max_seq_len, d_model) table held in the weights as `positions` and never trained, e.g. a GPT-2 model's
    learned position embedding kept as given on import (`andy_dist.infer.hf_import`); it starts as the sinusoid."""
    activation: str = "gelu"
    """Feed-forward activation: "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation GPT-2 was trained with)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
                f"(each head gets d_model / n_heads channels)"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads must be even, got {self.d_model // self.n_heads}")
        if self.d_model % 2:
            raise ConfigError(f"model.d_model must be even for the sinusoidal encoding, got {self.d_model}")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ConfigError(f"model.max_seq_len={self.max_seq_len} exceeds the maximum {MAX_SEQ_LEN}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_size <= 4:
            raise ConfigError(f"model.vocab_size must exceed the 4 special ids, got {self.vocab_size}")
        if self.position_table not in POSITION_TABLES:
            raise ConfigError(f"model.position_table must be one of {POSITION_TABLES}, got {self.position_table!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a dict; those added after the first release only when they differ from their default,
        so the configs in earlier checkpoints and model files still compare equal to today's."""
        data = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# The three documented sizes. Global batch ranges are in sequences per optimizer step.
SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=10_000, d_model=128, n_heads=2, n_layers=2),
    "small": ModelConfig(vocab_size=30_000, d_model=256, n_heads=4, n_layers=4),
    "medium": ModelConfig(vocab_size=50_000, d_model=512, n_heads=8, n_layers=6),
}

GLOBAL_BATCH_RANGE: dict[str, tuple[int, int]] = {
    "tiny": (32, 64),
    "small": (16, 32),
    "medium": (8, 16),
}


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """The named size, with optional field overrides (e.g. a smaller vocab for a small corpus)."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size].replace(**overrides) if overrides else SIZES[size]


def check_seq_len(seq_len: int, cfg: ModelConfig) -> None:
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"sequence length {seq_len} is longer than model.max_seq_len={cfg.max_seq_len}")


# ----------------------------------------------------------------------------------------------
# Training configuration: YAML file + key=value overrides, every key checked.


@dataclass
class TrainConfig:
    """Everything the trainer needs beyond the DeepSpeed JSON. Set from YAML (`--config`) and `key=value`."""

    size: str | None = None
    """Model size (tiny/small/medium); by default the ds_config's name or its "andy": {"size"} entry."""
    seed: int = 1234
    """Seeds the model init, the data order and dropout (dropout is re-seeded from (seed, step, rank))."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run max_epochs)."""
    max_epochs: int = 1
    """Stop after this many passes over the training split, unless max_steps comes first."""
    micro_batch_size: int | None = None
    """Sequences per rank per forward pass; default from the ds_config's train_micro_batch_size_per_gpu."""
    global_batch_size: int | None = None
    """Sequences per optimizer step; default: the smallest multiple of micro x ranks in the size's range."""
    max_tokens_per_micro_batch: int | None = None
    """Optional token budget: micro-batches of long sequences are cut to stay under it."""
    bucket_window: int = 1
    """Sort samples by length across this many global batches before cutting micro-batches: padding
    falls (about 39% -> 5% on short-document corpora at 16) at the cost of steps holding similar lengths."""
    lr: float = 3e-4
    """Peak learning rate, reached after warmup_steps."""
    warmup_steps: int = 1000
    """Linear warmup from 0 to lr over this many optimizer steps."""
    lr_decay_steps: int | None = None
    """Length of the schedule (warmup + cosine); default max_steps, else max_epochs x steps per epoch.
    Set it when a run will be extended or stopped early, so the schedule does not depend on where it stops."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    precision: str | None = None
    """bf16, fp16 or fp32; default from the ds_config."""
    zero_stage: int | None = None
    """ZeRO stage 0-3; default from the ds_config."""
    activation_checkpointing: bool | None = None
    """Recompute block activations in backward; default from the ds_config's "andy" section."""
    seq_len_start: int | None = None
    """Start training with samples capped at this many tokens (None: no schedule, full length)."""
    seq_len_ramp_steps: int = 0
    """Grow the cap linearly from seq_len_start to max_seq_len over this many steps."""
    memory_cap_gb: float | None = None
    """Cap this process's CUDA memory (e.g. 8 to prove a config fits an 8 GB card on a bigger one)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    stall_report_s: float | None = 300.0
    """When a rank finishes no step, evaluation or checkpoint for this long, it prints every thread's
    stack to stderr (once per stall) so a hang shows where it is; null: off."""
    dist_timeout_s: int = 600
    """How long a rank waits in a collective for a peer before the job fails (the process-group timeout)."""
    log_interval: int = 10
    """Log training figures every this many steps."""
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
    sample_interval: int | None = None
    """Generate samples every this many steps (always at each evaluation when sample_prompts is set)."""
    sample_prompts: tuple[str, ...] = ("The ", "def main():", "First Citizen:")
    """Prompts the model continues during training; empty to turn samples off."""
    sample_max_new_tokens: int = 48
    """Length of each generated sample."""
    sample_temperature: float = 0.8
    """Sampler settings for the training samples."""
    sample_top_k: int = 50
    sample_top_p: float = 0.95
    wandb: str | None = None
    """online, offline or disabled; default online when logged in, else offline."""
    wandb_project: str = "andy-llm"
    wandb_entity: str | None = None
    wandb_tags: tuple[str, ...] = ()
    run_name: str | None = None
    """Name of the run (W&B and logs); default: the --out folder's name."""
    model: dict = field(default_factory=dict)
    """Overrides of ModelConfig fields, e.g. model.vocab_size=2000 or model.dropout=0.0."""
    init_from: str | None = None
    """Start from these weights instead of a random init: a float .andy file or a Hugging Face GPT-2 directory
    (tools/import_hf.py). The model's shape comes from them; dropout and activation checkpointing from the run."""

    def check(self) -> None:
        positive = ("max_epochs", "lr", "warmup_steps", "log_interval", "save_interval", "keep_last", "patience",
                    "max_bad_steps", "sample_max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if value is None or value < (0 if name == "warmup_steps" else 1e-12):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        for name in ("max_steps", "lr_decay_steps", "micro_batch_size", "global_batch_size", "eval_interval", "sample_interval",
                     "seq_len_start", "max_tokens_per_micro_batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer or unset, got {value!r}")
        if self.size is not None and self.size not in SIZES:
            raise ConfigError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.wandb is not None and self.wandb not in ("online", "offline", "disabled"):
            raise ConfigError(f"wandb must be online, offline or disabled, got {self.wandb!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.seq_len_start is not None and self.seq_len_start > MAX_SEQ_LEN:
            raise ConfigError(f"seq_len_start={self.seq_len_start} exceeds the maximum {MAX_SEQ_LEN}")
        if self.bucket_window < 1:
            raise ConfigError(f"bucket_window must be >= 1, got {self.bucket_window}")
        if self.stall_report_s is not None and self.stall_report_s <= 0:
            raise ConfigError(f"stall_report_s must be positive or null (off), got {self.stall_report_s}")
        if self.dist_timeout_s < 1:
            raise ConfigError(f"dist_timeout_s must be at least 1 second, got {self.dist_timeout_s}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ConfigError(f"unknown model keys {['model.' + k for k in unknown]}; known: {sorted(known)}")


PRECISIONS = ("bf16", "fp16", "fp32")


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


def _coerce(name: str, value: Any, current: Any, annotation: str) -> Any:
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
            return float(value) if "tuple" not in annotation else value
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if "int" in annotation and "float" not in annotation and not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if "str" in annotation and not isinstance(value, str) and "int" not in annotation:
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def load_train_config(yaml_path: str | None = None, overrides: list[str] = (), **explicit: Any) -> TrainConfig:
    """YAML file, then `key=value` overrides, then explicit keyword values (from CLI flags), all checked."""
    import yaml

    values: dict[str, Any] = {}
    if yaml_path:
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
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        if key.startswith("model."):
            values.setdefault("model", {})
            values["model"] = {**values["model"], key[len("model."):]: _parse_value(text)}
        else:
            values[key] = _parse_value(text)
    values.update({k: v for k, v in explicit.items() if v is not None})
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(annotations))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(annotations)}")
    defaults = TrainConfig()
    coerced = {k: (v if k == "model" else _coerce(k, v, getattr(defaults, k), annotations[k])) for k, v in values.items()}
    if not isinstance(coerced.get("model", {}), dict):
        raise ConfigError("model must be a mapping of ModelConfig fields")
    cfg = dataclasses.replace(defaults, **coerced)
    cfg.check()
    return cfg


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are split: global = micro x accumulation x ranks."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def resolve_batch(size: str, world_size: int, micro_batch_size: int, global_batch_size: int | None = None) -> BatchPlan:
    """Choose gradient accumulation so the global batch lands in the size's range.

    With no global batch given: the smallest accumulation that reaches the range's low end. If
    micro x ranks alone already overshoots the range, the micro-batch is lowered (that only saves
    memory); if one sequence per rank still overshoots, the combination is impossible.
    """
    low, high = GLOBAL_BATCH_RANGE[size]
    if world_size < 1 or micro_batch_size < 1:
        raise ConfigError(f"world size ({world_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if world_size > high:
        raise ConfigError(
            f"{world_size} data-parallel ranks need at least {world_size} sequences per step, but the {size} "
            f"model's global batch must be {low}-{high}; use at most {high} ranks")
    if global_batch_size is not None:
        if not low <= global_batch_size <= high:
            raise ConfigError(f"global_batch_size={global_batch_size} is outside the {size} range {low}-{high}")
        per_step = micro_batch_size * world_size
        if global_batch_size % per_step:
            fits = [m for m in range(micro_batch_size, 0, -1) if global_batch_size % (m * world_size) == 0]
            hint = f"; micro_batch_size={fits[0]} would work" if fits else ""
            raise ConfigError(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size "
                              f"{micro_batch_size} x {world_size} ranks{hint}")
        return BatchPlan(micro_batch_size, global_batch_size // per_step, world_size)
    micro = min(micro_batch_size, high // world_size)
    accum = -(-low // (micro * world_size))  # ceil
    plan = BatchPlan(micro, accum, world_size)
    assert low <= plan.global_batch_size <= high, plan  # holds because every range has high >= 2 * low
    return plan
