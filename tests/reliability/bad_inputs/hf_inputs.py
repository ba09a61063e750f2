"""Inputs shared by the Hugging Face cases of several tools: the world's checkpoint as a Hugging Face
directory, a damaged copy of it, and a directory of another model family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.reliability.bad_inputs.runner import GARBAGE, run_here, write


def hf_dir(w) -> Path:
    """The world's checkpoint as a Hugging Face directory, exported once."""
    out = w.base / "hf"
    if not out.is_dir():
        result = run_here("export", "--hf", out, w.ckpt)
        assert result.code == 0, result.err
    return out


def hf_copy(w, tmp, drop=()) -> Path:
    hf = Path(shutil.copytree(hf_dir(w), tmp / "hf_copy"))
    for name in drop:
        (hf / name).unlink()
    return hf


def other_family(tmp) -> Path:
    write(tmp / "llama" / "config.json", json.dumps({"model_type": "llama", "hidden_size": 64,
                                                     "architectures": ["LlamaForCausalLM"]}))
    write(tmp / "llama" / "model.safetensors", GARBAGE)
    return tmp / "llama"
