"""Start training from given weights (`init_from=`): a float .andy file or a Hugging Face GPT-2 directory.

The source fixes the model's shape (its position table and activation too); the run keeps its own dropout and
activation checkpointing, and the size's batch range. Two calls in `andy_dist.train.run` use this module:
`init_model_config` while the run is planned (so --dry-run shows the shape), and `initial_model` where the
model is built, before DeepSpeed takes it, so every rank starts from the same weights. A resumed run then
loads its checkpoint over them as usual. The run's tokenizer (the shards') must be the one the source used.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.config import ConfigError, ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.model import AndyLM

# What the run decides, whatever the source: everything else is the source's.
RUN_KEYS = ("dropout",)
_loaded: dict[str, tuple[dict, ModelConfig, Tokenizer | None]] = {}


def _load(source: str) -> tuple[dict[str, torch.Tensor], ModelConfig, Tokenizer | None]:
    """(fp32 state, config, tokenizer or None) of the source, read once per process."""
    key = str(Path(source).resolve())
    if key not in _loaded:
        path = Path(source)
        if path.is_dir():
            from andy_dist.infer.hf_import import import_hf_model

            imported = import_hf_model(path, require_tokenizer=False)
            _loaded[key] = (imported.state, imported.cfg, imported.tokenizer)
        elif path.is_file():
            from andy_dist.infer.model_file import read_float_weights, read_header

            if json.loads(read_header(path)[1].get("quantization", "{}")).get("scheme") != "none":
                raise UserError(f"init_from={source} holds int8 weights; start from a float export "
                                f"(andy-export --fp32) or a Hugging Face directory")
            state, cfg, tokenizer, _ = read_float_weights(path)
            _loaded[key] = (state, cfg, tokenizer)
        else:
            raise UserError(f"init_from={source} does not exist; give a .andy file (andy-export --fp32, "
                            f"andy-import-hf) or a Hugging Face GPT-2 directory")
    return _loaded[key]


def init_model_config(source: str, run_model: ModelConfig, overrides: dict) -> ModelConfig:
    """The source's shape with the run's dropout; a `model.*` override of the shape that contradicts the source
    is an error."""
    _, cfg, _ = _load(source)
    shape = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in RUN_KEYS}
    clashes = [f"model.{k}={v!r} (the source has {shape[k]!r})" for k, v in overrides.items()
               if k in shape and shape[k] != v]
    if clashes:
        raise ConfigError(f"init_from={source} fixes the model's shape; drop {', '.join(clashes)}")
    return cfg.replace(**{k: getattr(run_model, k) for k in RUN_KEYS})


def initial_model(cfg: ModelConfig, source: str | None, tokenizer: Tokenizer,
                  activation_checkpointing: bool = False) -> AndyLM:
    """A new AndyLM of `cfg`, holding the source's weights when `source` is given."""
    model = AndyLM(cfg, activation_checkpointing=activation_checkpointing)
    if not source:
        return model
    state, _, source_tokenizer = _load(source)
    if source_tokenizer is not None and source_tokenizer.sha256 != tokenizer.sha256:
        raise UserError(f"init_from={source} was trained with another tokenizer (sha256 "
                        f"{source_tokenizer.sha256[:12]}) than this run's shards ({tokenizer.sha256[:12]}); "
                        f"make the shards with its tokenizer")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"init_from={source} has a vocabulary of {cfg.vocab_size}, this run's tokenizer "
                        f"{tokenizer.vocab_size}")
    model.load_state_dict(state)
    _loaded.pop(str(Path(source).resolve()), None)  # the model holds the weights now
    return model
