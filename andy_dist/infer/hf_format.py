"""Andy-LLM as Hugging Face GPT-2: weight names, their layout, and the config, in both directions.

Andy-LLM is GPT-2 in everything but names: pre-LayerNorm blocks with biases, one fused q|k|v projection, a
feed-forward of `ffn_mult` x width, a final LayerNorm, dropout in the same three places, a head that is
untied (`tie_word_embeddings: false`) or tied. GPT-2 adds its learned position embedding `wpe` exactly where we
add our position table, so the table (the sinusoid, or a stored one) is written as `wpe` and read back as a
stored table (`ModelConfig.position_table`). GPT-2's `Conv1D` keeps its weight as (in, out), the transpose of
`nn.Linear`'s. Exact GELU is transformers' "gelu" (its "gelu_new" is the tanh approximation), LayerNorm eps is
torch's 1e-5 and attention is scaled by 1/sqrt(head_dim), as in GPT-2.
"""

from __future__ import annotations

from typing import Iterator

import torch

from andy_dist import UserError
from andy_dist.config import ModelConfig
from andy_dist.infer.hf_tokenizer import SPECIAL_IDS
from andy_dist.model import sinusoidal_table

LAYER_NORM_EPS = 1e-5
# Our activation -> transformers' name; on import also the other names of the same functions.
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                      "gelu_fast": "gelu_tanh"}
_LINEARS = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ffn.fc": "mlp.c_fc", "ffn.out": "mlp.c_proj"}
_NORMS = {"ln_attn": "ln_1", "ln_ffn": "ln_2"}


def name_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(our name, GPT-2's name, transposed) for every tensor of the model (the tied head and table aside)."""
    yield "embed.weight", "transformer.wte.weight", False
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for a, b in _NORMS.items():
            for kind in ("weight", "bias"):
                yield f"{ours}.{a}.{kind}", f"{theirs}.{b}.{kind}", False
        for a, b in _LINEARS.items():
            yield f"{ours}.{a}.weight", f"{theirs}.{b}.weight", True
            yield f"{ours}.{a}.bias", f"{theirs}.{b}.bias", False
    yield "ln_out.weight", "transformer.ln_f.weight", False
    yield "ln_out.bias", "transformer.ln_f.bias", False
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", False


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our fp32 state dict -> GPT2LMHeadModel's (a tied head is left to transformers to tie)."""
    out = {theirs: (state[ours].t() if transposed else state[ours]).contiguous()
           for ours, theirs, transposed in name_pairs(cfg)}
    table = state.get("positions") if cfg.position_table == "stored" else None
    out["transformer.wpe.weight"] = table if table is not None else sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> ours (fp32), for a config made by `config_from_hf` (stored table)."""
    state = {}
    for ours, theirs, transposed in name_pairs(cfg):
        if theirs not in hf_state:
            raise UserError(f"{where} has no tensor {theirs}: not a complete GPT-2 model")
        tensor = hf_state[theirs].float()
        state[ours] = (tensor.t() if transposed else tensor).contiguous()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    table = hf_state["transformer.wpe.weight"].float()[: cfg.max_seq_len].contiguous()
    if cfg.position_table == "stored":
        state["positions"] = table
    return state


def recognise_sinusoid(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> ModelConfig:
    """`cfg` with position_table "sinusoidal" when GPT-2's wpe is exactly our sinusoid (one of our fp32
    exports), so it need not be carried as a stored table; any other table is kept as given."""
    table = hf_state["transformer.wpe.weight"]
    exact = table.dtype == torch.float32 and table.shape[0] >= cfg.max_seq_len and torch.equal(
        table[: cfg.max_seq_len], sinusoidal_table(cfg.max_seq_len, cfg.d_model))
    return cfg.replace(position_table="sinusoidal") if exact else cfg


def hf_config_dict(cfg: ModelConfig) -> dict:
    """GPT2Config keyword arguments for `cfg` (dropout: ours in all three of GPT-2's places)."""
    return dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ffn_mult * cfg.d_model, activation_function=ACTIVATION_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=LAYER_NORM_EPS,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=cfg.tie_embeddings, use_cache=True, architectures=["GPT2LMHeadModel"],
        n_ctx=cfg.max_seq_len,  # the old name of n_positions, which converters such as llama.cpp's still read
        **SPECIAL_IDS)


def config_from_hf(hf: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """Our ModelConfig for a GPT-2 config.json's values, and notes on what was adapted; other models refused."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where} holds a {hf.get('model_type') or 'unknown'!r} model, not GPT-2: only GPT-2-style "
                        f"models (model_type gpt2) can be imported")
    notes = []
    d_model, n_positions = int(hf.get("n_embd", 768)), int(hf.get("n_positions", 1024))
    inner = hf.get("n_inner") or 4 * d_model
    unsupported = {
        "add_cross_attention": hf.get("add_cross_attention", False),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_weights=false": not hf.get("scale_attn_weights", True),
        f"layer_norm_epsilon={hf.get('layer_norm_epsilon')}":
            hf.get("layer_norm_epsilon", LAYER_NORM_EPS) != LAYER_NORM_EPS,
        f"activation_function={hf.get('activation_function')!r}": hf.get("activation_function", "gelu_new")
        not in ACTIVATION_FROM_HF,
        f"n_inner={inner} (not a multiple of n_embd {d_model})": inner % d_model != 0,
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise UserError(f"{where}: this GPT-2 variant cannot be expressed as Andy-LLM ({', '.join(refused)})")
    max_len = min(n_positions, 512)
    if n_positions > max_len:
        notes.append(f"position table cut from {n_positions} to the first {max_len} rows (Andy-LLM's longest context)")
    dropouts = {float(hf.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    dropout = max(dropouts)
    if len(dropouts) > 1:
        notes.append(f"GPT-2 dropouts {sorted(dropouts)} differ; Andy-LLM has one: {dropout}")
    cfg = ModelConfig(vocab_size=int(hf["vocab_size"]), d_model=d_model, n_heads=int(hf.get("n_head", 12)),
                      n_layers=int(hf.get("n_layer", 12)), max_seq_len=max_len, ffn_mult=inner // d_model,
                      dropout=dropout, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                      position_table="stored", activation=ACTIVATION_FROM_HF[hf.get("activation_function", "gelu_new")])
    return cfg, notes
