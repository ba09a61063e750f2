"""The Andy-LLM decoder-only Transformer, in plain PyTorch.

Written for one device: parallelism (ZeRO, data parallel) is applied from outside by
`andy_dist.train.engine`, and inference (`andy_dist.infer.generate`) drives the same module through a
preallocated `KVCache`. Nothing here imports DeepSpeed.

Shapes: B batch, T query length, S key length (past + current), C d_model, H heads, D head dim.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from andy_dist.config import ModelConfig
from andy_dist.lm_head import LMHead, token_loss

__all__ = ["AndyLM", "KVCache", "LMOutput", "sinusoidal_table", "token_loss"]


class LMOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # (B, T, V), or (B, 1, V) with last_only; None when targets were given
    loss_sum: Optional[torch.Tensor]  # summed cross-entropy over non-PAD targets (fp32 scalar)
    target_tokens: Optional[torch.Tensor]  # how many targets were not PAD (int64 scalar)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    `length` counts the positions already written; a forward pass with a cache writes its T new
    positions at [length, length + T) and advances it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (e.g. to drop finished rows)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


def cache_write_read(
    cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor, start
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one layer's new keys and values (B, H, T, D) at positions [start, start + T) of its cache
    and return the keys and values to attend to.

    start an int (prefill, or `forward` with a cache): the written prefix [0, start + T), whose
    length changes every step. start a (1,) tensor (`AndyLM.decode_step`, T = 1): the whole buffer,
    so that every step has the same shapes and can be compiled or captured in a CUDA graph; the
    caller's mask hides the positions not written yet.
    """
    cache_k, cache_v = cache
    if isinstance(start, torch.Tensor):
        cache_k.index_copy_(2, start, k.to(cache_k.dtype))
        cache_v.index_copy_(2, start, v.to(cache_v.dtype))
        return cache_k.to(k.dtype), cache_v.to(v.dtype)
    T = k.shape[2]
    cache_k[:, :, start : start + T] = k.to(cache_k.dtype)
    cache_v[:, :, start : start + T] = v.to(cache_v.dtype)
    return cache_k[:, :, : start + T].to(k.dtype), cache_v[:, :, : start + T].to(v.dtype)  # (B, H, S, D)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim): sin on even channels, cos on odd ones, wavelengths 2*pi .. 10000*2*pi.

    Always computed on CPU (the module moves it with the rest), also when a model is built on the
    meta device to receive loaded weights: meta arithmetic would import torch's compiler stack.
    """
    position = torch.arange(max_len, dtype=torch.float32, device="cpu")[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, device="cpu")
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def attention_mask_for(
    padding_mask: Optional[torch.Tensor], query_len: int, start: int, device
) -> tuple[Optional[torch.Tensor], bool]:
    """The SDPA mask for T queries at absolute positions [start, start + T).

    Returns (mask, is_causal). Without padding the fast causal kernels are used (mask None).
    With a (B, S) padding mask (1 = real token) the result is a boolean (B, 1, T, S) mask: causal,
    real keys only, and every query may always see its own position so that a row of padding
    (left padding in generation) stays finite instead of becoming NaN; those rows' outputs are
    never used for a real token.
    """
    key_len = start + query_len
    if padding_mask is None:
        if start == 0:
            return None, True
        if query_len == 1:
            return None, False  # one new token sees the whole past
        padding_mask = torch.ones(1, key_len, dtype=torch.bool, device=device)
    if padding_mask.shape[-1] != key_len:
        raise ValueError(f"attention_mask covers {padding_mask.shape[-1]} positions, expected {key_len}")
    query_pos = torch.arange(start, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None] & padding_mask.bool()[:, None, :]  # (B, T, S)
    allowed = allowed | (key_pos == query_pos)[None]
    return allowed[:, None], False


# Decoding with a cache gives SDPA a new key length at every step. cuDNN's attention builds a new
# execution plan per shape (measured on an H200: 7 ms of CPU per call, 20x the whole step), so
# cached decoding on CUDA uses the other kernels; training (fixed shapes) may still pick cuDNN. On
# CPU the choice does not arise, and entering the context costs ~20 us per layer and step.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, mask, is_causal: bool, cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                start: Union[int, torch.Tensor] = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache_write_read(cache, k, v, start)  # (B, H, S, D)
        with sdpa_kernel(_DECODE_BACKENDS) if cache is not None and x.is_cuda else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.out = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.out(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, is_causal: bool, cache=None, start: Union[int, torch.Tensor] = 0):
        x = x + self.drop(self.attn(self.ln_attn(x), mask, is_causal, cache, start))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class AndyLM(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False, init_weights: bool = True):
        """`activation_checkpointing`: recompute each block's activations in backward instead of storing
        them (a training setting: it changes memory and time, never the weights or the results).
        init_weights=False leaves the parameters uninitialised, for weights loaded right after
        (initialising on the meta device imports torch's compiler stack: ~2 s of a cold start)."""
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        # Given its tensor, an embedding skips its normal_ init, which on the meta device imports torch's compiler.
        empty = None if init_weights else torch.empty(cfg.padded_vocab_size, cfg.d_model)
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, _weight=empty)
        # A buffer, never a parameter: not trained. Saved with the weights only when it is a stored table.
        self.register_buffer("positions", sinusoidal_table(cfg.max_seq_len, cfg.d_model),
                             persistent=cfg.position_table == "stored")
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.lm_head = LMHead(cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if init_weights:
            self._init_all()

    def _init_all(self) -> None:
        self.apply(self._init_weights)
        with torch.no_grad():  # rows past the vocabulary (padding) are never read: keep them inert
            self.embed.weight[self.cfg.vocab_size :].zero_()
            self.lm_head.weight[self.cfg.vocab_size :].zero_()
        # GPT-2: scale the residual projections so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.ffn.out):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """The model's parameters as exported: a tied embedding counted once, the padded vocabulary rows not
        (the sinusoidal table is not a parameter)."""
        padding = (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.d_model
        return sum(p.numel() for p in self.parameters()) - padding * (1 if self.cfg.tie_embeddings else 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        last_only: bool = False,
    ) -> LMOutput:
        """input_ids (B, T); targets (B, T) with PAD where no loss is wanted.

        attention_mask: (B, S) with 1 for real tokens, covering past + current positions when a
        cache is given. position_ids: (B, T); by default each row counts from its first real token
        (so left-padded rows start at 0), or continues from the cache.
        """
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask, is_causal = attention_mask_for(attention_mask, T, start, input_ids.device)

        x = self.embed(input_ids) + self.positions[position_ids].to(self.embed.weight.dtype)  # (B, T, C)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layer(i) if kv_cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, cache, start)
        if kv_cache is not None:
            kv_cache.length = start + T
        x = self.ln_out(x)
        if last_only:
            x = x[:, -1:]
        if targets is None:
            return LMOutput(self.lm_head(x), None, None)  # (B, T, V)
        if isinstance(self.lm_head, LMHead):  # chunked: the (B, T, V) logits are never formed
            loss_sum, count = self.lm_head(x, targets)
        else:  # an inference head (int8) of an exported model, whose rows are the vocabulary
            loss_sum, count = token_loss(self.lm_head(x), targets)
        return LMOutput(None, loss_sum, count)

    def decode_step(
        self, token: torch.Tensor, position: torch.Tensor, kv_cache: KVCache, write_at: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One new token per row with shapes that do not change from step to step (gpt-fast's
        decode), so that it can be compiled or captured in a CUDA graph; prefill goes through `forward`.

        token, position: (B, 1) token ids and their position ids; write_at: (1,) long, the cache
        index of this step (the same for every row: rows are left-padded); key_mask: (B, S) bool
        over the whole cache, True where the row has a real token (its prompt, and every generated
        position). Positions after write_at are hidden here. Returns (B, V) logits; unlike
        `forward`, `kv_cache.length` is left to the caller.
        """
        S = key_mask.shape[-1]
        written = torch.arange(S, device=key_mask.device) <= write_at  # (S,)
        allowed = (key_mask & written)[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed(token) + self.positions[position].to(self.embed.weight.dtype)  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, False, kv_cache.layer(i), write_at)
        return self.lm_head(self.ln_out(x))[:, -1]  # (B, V)
