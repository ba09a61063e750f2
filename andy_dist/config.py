"""The model's shape, the three sizes, and the batch maths every launcher shares.

Checks on a model config live here, so a bad value fails in one place with a message that names
the field. The model gets a `ModelConfig`, never the whole run configuration; the training settings
are `andy_dist.train.settings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from andy_dist import UserError

MAX_SEQ_LEN = 512
POSITION_TABLES = ("sinusoidal", "stored")
ACTIVATIONS = ("gelu", "gelu_tanh")
# ModelConfig fields added after checkpoints and model files were first written, with their defaults.
_LATER_FIELDS = {"position_table": "sinusoidal", "activation": "gelu", "vocab_pad_multiple": 1}


# Keys that older versions wrote into a model config and that are no longer part of a model's shape.
LEGACY_MODEL_KEYS = ("activation_checkpointing",)


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
    position_table: str = "sinusoidal"
    """Where position vectors come from. "sinusoidal": computed from the shape, never saved. "stored": a fixed
    (max_seq_len, d_model) table held in the weights as `positions` and never trained, e.g. a GPT-2 model's
    learned position embedding kept as given on import (`andy_dist.infer.hf_import`); it starts as the sinusoid."""
    activation: str = "gelu"
    """Feed-forward activation: "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation GPT-2 was trained with)."""
    vocab_pad_multiple: int = 1
    """The embedding and LM-head rows are rounded up to a multiple of this (128 for the shipped sizes: GPU
    matrix kernels tile such a dimension without a ragged edge). The extra rows are never sampled, take no
    part in the loss and are never exported. A config without this key (written before it existed) is
    unpadded, which is what 1 means."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "ffn_mult", "vocab_pad_multiple"):
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

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: `vocab_size` rounded up to `vocab_pad_multiple`.

        Everything that means token ids (sampling, the loss, export, tokenizer checks) uses
        `vocab_size`; only the two weight matrices have these rows."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

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
        # Checkpoints and model files written before activation checkpointing became a training setting
        # (`engine.activation_checkpointing`) carry it in their model config; it never changed the shape.
        data = {k: v for k, v in data.items() if k not in LEGACY_MODEL_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# Rows of the shipped sizes' embedding and head: 50,000 -> 50,048, 30,000 -> 30,080, 10,000 -> 10,112.
VOCAB_PAD_MULTIPLE = 128

# The three documented sizes. Global batch ranges are in sequences per optimizer step.
SIZES: dict[str, ModelConfig] = {
    name: ModelConfig(vocab_size=vocab, d_model=d, n_heads=heads, n_layers=layers,
                      vocab_pad_multiple=VOCAB_PAD_MULTIPLE)
    for name, (vocab, d, heads, layers) in {"tiny": (10_000, 128, 2, 2), "small": (30_000, 256, 4, 4),
                                            "medium": (50_000, 512, 8, 6)}.items()
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


PRECISIONS = ("bf16", "fp16", "fp32")


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
