"""Checkpoint weight averaging: the mean of several checkpoints' fp32 weights, one model to export.

Averaging the last few checkpoints of one run (same initialisation, nearby in training) usually lands
nearer the middle of the valley the optimizer was circling than any one of them. Every tag must hold the same
model shape and tokenizer; the sum is kept in float64, so the result is the exact mean rounded once to fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.infer.export import load_checkpoint_weights
from andy_dist.train.checkpoint_format import checkpoint_dir, complete_step_tags


def last_step_tags(ckpt_dir: str | Path, count: int) -> list[str]:
    """The `count` newest complete step-NNNNNN tags under `ckpt_dir` (or runs/NAME), oldest first."""
    if count < 2:
        raise UserError(f"--average-last needs at least 2 checkpoints, got {count}")
    ckpt = checkpoint_dir(ckpt_dir)
    steps = complete_step_tags(ckpt)
    if len(steps) < count:
        raise UserError(f"--average-last {count}: {ckpt} holds only {len(steps)} step checkpoint(s) "
                        f"({', '.join(t for _, t in steps) or 'none'}); keep more with keep_last=N")
    return [tag for _, tag in steps[-count:]]


def average_checkpoints(ckpt_dir: str | Path, tags: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(mean fp32 weights, metadata of the newest tag plus "averaged_tags") of `tags` under `ckpt_dir`."""
    if len(set(tags)) < 2:
        raise UserError(f"--average needs at least 2 different tags, got {tags}")
    sums: dict[str, torch.Tensor] = {}
    metas = []
    for tag in tags:
        state, meta = load_checkpoint_weights(ckpt_dir, tag)
        if metas and (meta["model_config"], meta.get("tokenizer_sha256")) != (
                metas[0]["model_config"], metas[0].get("tokenizer_sha256")):
            raise UserError(f"checkpoint {tag} holds another model or tokenizer than {metas[0]['tag']}; "
                            f"only checkpoints of one run can be averaged")
        metas.append(meta)
        for name, tensor in state.items():
            sums[name] = sums[name] + tensor.double() if name in sums else tensor.double()
    mean = {name: (total / len(tags)).float() for name, total in sums.items()}
    newest = max(metas, key=lambda m: (m.get("trainer_state") or {}).get("step", m.get("step") or 0))
    return mean, dict(newest, averaged_tags=[m["tag"] for m in metas])
