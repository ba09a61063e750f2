"""The README.md model card of an exported Hugging Face directory: what the model is, how it was trained, how
it was made and how to use it. Every figure comes from the checkpoint's metadata; what is unknown says so."""

from __future__ import annotations

import math

import torch

from andy_dist import __version__
from andy_dist.config import ModelConfig
from andy_dist.model import AndyLM

USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
inputs = tokenizer(["To be", "def main():"], return_tensors="pt", padding=True)  # BOS first, left padding
out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
print(tokenizer.batch_decode(out, skip_special_tokens=True))
print(pipeline("text-generation", model="{path}")("To be", max_new_tokens=40)[0]["generated_text"])
```'''


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters, a tied head counted once (as `AndyLM.num_parameters`; built on the meta device)."""
    with torch.device("meta"):
        return AndyLM(cfg).num_parameters()


def _or_unknown(value) -> str:
    return "unknown" if value is None else str(value)


def _training(info: dict, cfg: ModelConfig) -> str:
    """What is known of the training run, e.g. "500 optimizer steps, 8,192,000 tokens, bf16, ZeRO stage 2 on 8
    rank(s)"."""
    known = (("step", "{} optimizer steps"), ("tokens_seen", "{:,} tokens"), ("precision", "{}"))
    parts = [template.format(info[key]) for key, template in known if info.get(key) is not None]
    if info.get("zero_stage") is not None and info.get("world_size") is not None:
        parts.append(f"ZeRO stage {info['zero_stage']} on {info['world_size']} rank(s)")
    if info.get("averaged_tags"):
        parts.append(f"weights averaged over {', '.join(info['averaged_tags'])}")
    return ", ".join(parts + [f"dropout {cfg.dropout}"])


def model_card(cfg: ModelConfig, dtype: str, info: dict) -> str:
    """Markdown for `cfg` exported as `dtype`; `info` holds what is known of the source (see tools/export.py)."""
    name = info.get("name") or "Andy-LLM"
    positions = ("sinusoidal, stored as GPT-2's position embedding" if cfg.position_table == "sinusoidal"
                 else "a fixed table (imported as given), stored as GPT-2's position embedding")
    loss = info.get("best_val_loss")
    val = ("not measured" if loss is None
           else f"{loss:.4f} (perplexity {math.exp(loss):.2f}) at step {info.get('best_step')}")
    rows = [
        ("parameters", f"{parameter_count(cfg):,} ({'tied' if cfg.tie_embeddings else 'untied'} LM head)"),
        ("vocabulary", f"{cfg.vocab_size:,} SentencePiece BPE pieces, byte fallback; PAD 0, UNK 1, BOS 2, EOS 3"),
        ("shape", f"d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_layers} layers, feed-forward {cfg.ffn_mult}x, "
                  f"{'exact' if cfg.activation == 'gelu' else 'tanh-approximated'} GELU, pre-LayerNorm"),
        ("context", f"{cfg.max_seq_len} tokens; positions {positions}"),
        ("weights", dtype),
        ("training data", _or_unknown(info.get("data"))),
        ("training", _training(info, cfg)),
        ("validation loss", val),
        ("made from", info.get("made_from") or "unknown"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [andy-llm, gpt2, text-generation]
---

# {name}

An Andy-LLM decoder-only Transformer trained with andy_dist {__version__}, saved in the GPT-2 format: it loads
with `AutoModelForCausalLM` and `AutoTokenizer`, no custom code and no `trust_remote_code`.

| | |
|---|---|
{table}

`tokenizer(text)` puts BOS first, as the model saw every document in training; prompts pad on the left.
`generation_config.json` samples (temperature 0.8, top-k 50, top-p 0.95) unless `do_sample=False` is passed.

## Use

{USAGE.format(path=info.get("path") or "PATH")}
"""
