"""Write a model as a Hugging Face directory that `transformers` loads with no custom code.

    OUT/config.json              GPT2Config (see `andy_dist.infer.hf_format`), our special ids
    OUT/model.safetensors        GPT2LMHeadModel's weights, in the chosen dtype
    OUT/generation_config.json   BOS/EOS/PAD ids and a default sampling setup
    OUT/tokenizer.json, tokenizer_config.json, tokenizer.model   (`andy_dist.infer.hf_tokenizer`)
    OUT/README.md                a model card: sizes, data, training, validation loss, how it was made

The directory is written beside OUT under a temporary name and renamed into place when complete, so a
failure leaves nothing under OUT; an existing non-empty OUT is replaced only with `force`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UserError
from andy_dist.cli import check_output_path
from andy_dist.config import ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.infer.hf_format import hf_config_dict, to_hf_state
from andy_dist.infer.hf_tokenizer import save_hf_tokenizer
from andy_dist.infer.model_card import model_card
from andy_dist.infer.model_file import DTYPES

# The sampling setup a plain `model.generate(...)` uses: the one our training samples use.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 128}


def check_hf_output(out: str | Path, force: bool, option: str = "--hf") -> Path:
    """Refuse an output directory that cannot be written, or holds files and `force` is off (before any work)."""
    out = check_output_path(out, option, directory=True)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{option} {out} exists and is not empty; choose a new directory or pass --force to replace it")
    return out


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("the Hugging Face export needs transformers: pip install 'andy-dist[hf]'") from None


def write_hf_directory(out: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer,
                       dtype: str = "fp32", card: dict | None = None, force: bool = False) -> Path:
    """Write `state` (fp32 AndyLM weights of `cfg`) and `tokenizer` as a transformers directory at `out`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {sorted(DTYPES)}")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {cfg.vocab_size}: "
                        f"export with the run's own tokenizer.model")
    require_transformers()
    out = check_hf_output(out, force)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        _save_model(partial, state, cfg, dtype)
        _save_generation_config(partial)
        save_hf_tokenizer(tokenizer, partial, cfg.max_seq_len)
        (partial / "README.md").write_text(model_card(cfg, dtype, card or {}), encoding="utf-8")
        _readable_by_all(partial)
        _replace_directory(partial, out)
    except OSError as err:
        raise UserError(f"could not write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _save_model(directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**hf_config_dict(cfg))
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(to_hf_state(state, cfg), strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(f"GPT-2 does not match the exported weights: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.to(DTYPES[dtype]).save_pretrained(str(directory))


def _save_generation_config(directory: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                     **DEFAULT_SAMPLING).save_pretrained(str(directory))


def _readable_by_all(directory: Path) -> None:
    """Give every file the permissions the umask allows (transformers writes the weights through a private
    temporary file, mode 0600), so a directory meant to be shared is readable like the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_directory(partial: Path, final: Path) -> None:
    """Move the finished `partial` to `final`; a previous `final` (allowed by --force) goes only afterwards."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
