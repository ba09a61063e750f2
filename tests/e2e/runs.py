"""What the end-to-end tests launch: argument lists and a finished run (fixtures in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TINY_GLOBAL_BATCH = 32  # ds_configs/tiny.json: 16 sequences x 2 ranks x 1 accumulation


@dataclass
class Run:
    out: Path
    stdout: str
    steps_per_epoch: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def tiny_args(shards, tokenizer_path, out, *extra) -> list:
    """The shipped tiny config (bf16, ZeRO-1) on the session's 2,000-piece tokenizer; nothing else changed."""
    return ["--ds_config", "ds_configs/tiny.json", "--data", shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "--wandb", "disabled", *extra]


def common(shards, tokenizer_path, out, *extra) -> list:
    """fp32, every step logged, a fixed schedule length (lr_decay_steps) so stopping early does not change
    the learning rates of the steps that follow; no samples."""
    return ["--ds_config", "ds_configs/tiny.json", "--data", shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "precision=fp32", "lr=2e-3", "warmup_steps=4", "lr_decay_steps=16",
            "log_interval=1", "sample_prompts=[]", *extra]
