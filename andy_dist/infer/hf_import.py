"""A Hugging Face GPT-2 directory -> our fp32 state dict, ModelConfig and tokenizer, for fine-tuning from it.

Reads config.json, the safetensors weights (one file or an index of shards; pickled `pytorch_model.bin` is
refused, like every pickle here) and the tokenizer: the directory's tokenizer.model (written by our export),
or one given explicitly, which must be a tokenizer of ours with the model's vocabulary size. Needs neither
transformers nor a network. What GPT-2 has and Andy-LLM lacks is refused (`hf_format.config_from_hf`); a
learned position table is kept frozen exactly as given (`ModelConfig.position_table = "stored"`), except
that rows past our 512-token context are dropped. Our own fp32 exports come back with their sinusoid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from andy_dist import UserError
from andy_dist.config import ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.infer.hf_format import config_from_hf, from_hf_state, recognise_sinusoid

# Old GPT-2 checkpoints also hold the causal mask as tensors; they are not weights.
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")


@dataclass
class ImportedModel:
    state: dict[str, torch.Tensor]
    cfg: ModelConfig
    tokenizer: Tokenizer | None
    notes: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)


def is_hf_directory(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"{hf_dir} is not a directory; pass a Hugging Face model directory (config.json, "
                        f"model.safetensors)")
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a model configuration")
    return config


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        return [hf_dir / name for name in names]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if (hf_dir / "pytorch_model.bin").exists():
        raise UserError(f"{hf_dir} holds only pytorch_model.bin, a pickle, which is never loaded here; save the model "
                        f"with safe_serialization (model.save_pretrained(dir)) to get model.safetensors")
    raise UserError(f"{hf_dir} has no model.safetensors")


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, named as in GPT2LMHeadModel (transformer.*)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(hf_dir)):
        if not path.is_file():
            raise UserError(f"{path} is missing (named by model.safetensors.index.json)")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    named = {}
    for name, tensor in tensors.items():
        if name.endswith(_NOT_WEIGHTS):
            continue
        named[name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name] = tensor
    return named


def _tokenizer(hf_dir: Path, explicit: str | Path | None, vocab_size: int, required: bool) -> Tokenizer | None:
    path = Path(explicit) if explicit else hf_dir / "tokenizer.model"
    if not path.exists() and not required:
        return None
    if not path.exists():
        raise UserError(f"{hf_dir} has no tokenizer.model (an andy_dist SentencePiece tokenizer); pass --tokenizer "
                        f"DIR/tokenizer.model with {vocab_size} pieces, the one to train the model with")
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"tokenizer {path} has {tokenizer.vocab_size} pieces but the model {vocab_size}; "
                        f"pass the tokenizer the model was trained with")
    return tokenizer


def import_hf_model(hf_dir: str | Path, tokenizer: str | Path | None = None,
                    require_tokenizer: bool = True) -> ImportedModel:
    """Read the GPT-2 directory `hf_dir` as an Andy-LLM model (see the module docstring). Without a tokenizer
    (none in the directory, none given) `tokenizer` is None if not `require_tokenizer`, else an error."""
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    cfg, notes = config_from_hf(hf_config, str(hf_dir))
    hf_state = read_hf_weights(hf_dir)
    if "transformer.wpe.weight" not in hf_state:
        raise UserError(f"{hf_dir} has no position embedding (transformer.wpe.weight): not a complete GPT-2 model")
    if not cfg.tie_embeddings and "lm_head.weight" not in hf_state:
        raise UserError(f"{hf_dir} says tie_word_embeddings is false but holds no lm_head.weight")
    cfg = recognise_sinusoid(cfg, hf_state)
    state = from_hf_state(hf_state, cfg, str(hf_dir))
    _check_shapes(state, cfg, hf_dir)
    source = {"hf_dir": str(hf_dir.resolve()), "model_type": "gpt2",
              "architectures": hf_config.get("architectures")}
    return ImportedModel(state, cfg, _tokenizer(hf_dir, tokenizer, cfg.vocab_size, require_tokenizer), notes, source)


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, hf_dir: Path) -> None:
    from andy_dist.model import AndyLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AndyLM(cfg).state_dict().items()}
    wrong = sorted(k for k, shape in expected.items() if k not in state or tuple(state[k].shape) != shape)
    if wrong:
        raise UserError(f"{hf_dir}: the weights do not match its config.json (shapes of {wrong[:4]})")
