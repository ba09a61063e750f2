"""Helpers of the shard writer and reader tests: documents written as .jsonl, every sample of a split read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def all_samples(shard_set, split: str) -> list[np.ndarray]:
    reader = shard_set.reader(split)
    return reader.read(np.arange(shard_set.num_samples(split)))
