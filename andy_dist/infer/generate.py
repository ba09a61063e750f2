"""KV-cached, batched generation over one model or an ensemble.

One batch goes: left-pad the prompts to the longest (PAD, masked out; each row's positions start
at its first real token), prefill the preallocated `KVCache` with the prompts, then one-token
decode steps that read only the last position's logits. A row stops at EOS (the EOS is returned)
or when its own budget runs out: `max_new_tokens`, and prompt + new tokens never beyond the
model's max_seq_len (512). A stopped row stays stopped (it is fed PAD, its output ignored) until
stopped rows are a quarter of the batch; then they leave it, cache and all, and decode steps
compute only the rows still running (with a compiled or CUDA-graph decode step, the batch shrinks
only to a power of two, so that few shapes are compiled: `andy_dist.infer.decode`).

Prefill runs the model's `forward`; each later token runs `AndyLM.decode_step`, whose shapes stay
the same from step to step (`compile=` chooses eager, torch.compile or a CUDA graph for it).

Prompts are grouped by length (longest first) into batches of `batch_size`, so padding stays
small; results come back in the caller's order. If a short row still has budget when the
batch's cache is full (the longest row filled it), it continues in a later round from its
prompt + the tokens generated so far.

Ensemble: several models sharing a tokenizer each keep their own cache; the next token is chosen
from the mean of their log-probabilities (for one model, from its raw logits, so the repetition
penalty's sign rule applies to logits as documented in `andy_dist.infer.token_sampling`).

Only ids below `valid_vocab` are ever chosen: the scores are cut to those columns before sampling.
`generate_text` passes the tokenizer's size, so a model whose vocabulary is larger than its tokenizer
(trained on a smaller tokenizer's shards) never produces an id the tokenizer cannot decode; the model's
own padded rows never reach here (`andy_dist.lm_head`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from andy_dist import EOS_ID, PAD_ID, UserError
from andy_dist.infer.decode import Decoder, decoder_for
from andy_dist.infer.token_sampling import SamplingConfig, next_token
from andy_dist.model import AndyLM

Models = Union[AndyLM, Sequence[AndyLM]]

# Finished rows leave the batch when they are this fraction of it (above 1: never; for benchmarks).
SHED_FINISHED_AT = 0.25


def _as_list(models: Models) -> list[AndyLM]:
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models:
        raise UserError("generate needs at least one model")
    vocab = {m.cfg.vocab_size for m in models}
    if len(vocab) > 1:
        raise UserError(f"ensemble members have different vocabularies {sorted(vocab)}: they need one tokenizer")
    return models


def _device(model: AndyLM) -> torch.device:
    return model.ln_out.weight.device


def _scores(logits: list[torch.Tensor], valid_vocab: int) -> torch.Tensor:
    """(B, valid_vocab) scores from each member's last-position logits (B, V): ids past valid_vocab are cut."""
    logits = [lg[:, :valid_vocab] for lg in logits]
    if len(logits) == 1:
        return logits[0].float()
    return torch.stack([torch.log_softmax(lg.float(), dim=-1) for lg in logits]).mean(0)


def _left_padded(prompts: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids, PAD on the left, and (B, width) key mask: True from each row's first real token on
    (generated positions are real for every row)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return ids.to(device), mask.to(device)


def _rows_to_keep(finished: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of `size` rows: every running row, then finished ones to fill up, in batch order."""
    running, stopped = (~finished).nonzero().squeeze(1), finished.nonzero().squeeze(1)
    return torch.cat([running, stopped[: size - len(running)]]).sort().values


def _seen_ids(ids: torch.Tensor, prompts: list[list[int]], unseen_prefix: list[int], steps: int) -> torch.Tensor:
    """(B, P + steps) the ids the repetition penalty counts: the prompt but each row's unseen prefix,
    then PAD where the generated tokens will be written."""
    B, P = ids.shape
    seen = torch.full((B, P + steps), PAD_ID, dtype=torch.long, device=ids.device)
    seen[:, :P] = ids
    for i, p in enumerate(prompts):
        seen[i, P - len(p) : P - len(p) + unseen_prefix[i]] = PAD_ID
    return seen


@dataclass
class _Rows:
    """What each row still in the batch carries; rows leave together with all of it."""

    index: torch.Tensor  # (b,) the row's place in the caller's batch
    finished: torch.Tensor  # (b,) bool: stopped (EOS or budget), fed PAD from now on
    budget: torch.Tensor  # (b,) new tokens the row may have
    positions: torch.Tensor  # (b, 1) the position id of its next token
    mask: torch.Tensor  # (b, S) key mask over the cache
    seen: Optional[torch.Tensor]  # (b, P + steps) ids for the repetition penalty, or None

    def keep(self, rows: torch.Tensor) -> "_Rows":
        return _Rows(*(None if v is None else v[rows] for v in (getattr(self, f.name) for f in fields(self))))


@torch.inference_mode()
def _generate_batch(
    decoders: list[Decoder], prompts: list[list[int]], budgets: list[int], sampling: SamplingConfig,
    eos_id: int, generator: Optional[torch.Generator], unseen_prefix: list[int], valid_vocab: Optional[int] = None,
) -> tuple[list[list[int]], list[bool]]:
    """One left-padded batch: (new tokens per row, whether the row is done) - a row not done ran
    out of cache before its budget and must continue in another round."""
    models = [d.model for d in decoders]
    valid_vocab = valid_vocab or models[0].cfg.vocab_size
    device, max_len = _device(models[0]), min(m.cfg.max_seq_len for m in models)
    B, P = len(prompts), max(len(p) for p in prompts)
    steps = min(max(budgets), max_len - P)
    length = decoders[0].cache_length(P + steps)  # every decoder of an ensemble buckets alike
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids, mask = _left_padded(prompts, length, device)
    padded = bool((lengths < P).any())  # without padding the causal fast path needs no mask
    live = _Rows(torch.arange(B, device=device), torch.zeros(B, dtype=torch.bool, device=device),
                 torch.tensor(budgets, device=device), lengths.clone()[:, None], mask,
                 _seen_ids(ids, prompts, unseen_prefix, steps) if sampling.repetition_penalty != 1.0 else None)
    caches = [d.new_cache(B, length) for d in decoders]
    write_at = torch.tensor([P], device=device)  # (1,) the cache index of the next token
    logits = [m(ids, attention_mask=mask[:, :P] if padded else None, kv_cache=c, last_only=True).logits[:, -1]
              for m, c in zip(models, caches)]  # prefill; (B, V) each
    out = torch.full((B, steps), PAD_ID, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per original row, filled in as rows leave
    produced = 0
    for t in range(steps):
        scores = _scores(logits, valid_vocab)
        token = next_token(scores, sampling, live.seen, generator).masked_fill(live.finished, PAD_ID)
        out[live.index, t] = token
        produced = t + 1
        live.finished |= (token == eos_id) | (live.budget <= t + 1)
        stopped, batch = int(live.finished.sum()), len(live.finished)
        if t + 1 == steps or stopped == batch:
            break
        if live.seen is not None:
            live.seen[:, P + t] = token
        size = decoders[0].batch_size(batch - stopped, batch)
        if stopped >= SHED_FINISHED_AT * batch and size < batch:
            # Drop finished rows once they are a quarter of the batch: later steps compute only live
            # rows, and the copy of the cache is paid back within a few steps.
            keep = _rows_to_keep(live.finished, size)
            leaving = torch.ones_like(live.finished)
            leaving[keep] = False
            done[live.index[leaving]] = True
            live, token = live.keep(keep), token[keep]
            caches = [d.keep_rows(c, keep) for d, c in zip(decoders, caches)]
        logits = [d.step(c, token[:, None], live.positions, write_at, live.mask) for d, c in zip(decoders, caches)]
        live.positions += 1
        write_at += 1
    done[live.index] = live.finished

    results = []
    for row, n in zip(out[:, :produced].tolist(), budgets):
        row = row[:n]
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results, done.tolist()


def _check_request(model_vocab: int, max_len: int, prompts: list[list[int]], batch_size: Optional[int],
                   valid_vocab: Optional[int]) -> int:
    """The ids generation may produce (valid_vocab, else the model's vocabulary), once the request is checked."""
    vocab = model_vocab
    if valid_vocab is not None:
        if not 0 < valid_vocab <= vocab:
            raise UserError(f"valid_vocab={valid_vocab} must be in 1..{vocab}: a tokenizer with more pieces than "
                            f"the model's vocabulary ({vocab}) does not belong to it")
        vocab = valid_vocab
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty; start it with BOS (tokenizer.encode(text, bos=True))")
        if len(p) >= max_len:
            raise UserError(f"prompt {i} has {len(p)} tokens; at most {max_len - 1} leave room to generate")
        if min(p) < 0 or max(p) >= vocab:
            raise UserError(f"prompt {i} holds token ids outside [0, {vocab})")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    return vocab


def generate(
    model: Models,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int = EOS_ID,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    compile: str = "off",
    valid_vocab: Optional[int] = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included where wanted), EOS kept where reached.

    model: an AndyLM in eval mode (any dtype, CPU or GPU), or a list of them for an ensemble.
    seed: makes the run repeatable (the same prompts, batch size and device give the same tokens);
    None uses torch's global generator. batch_size: prompts per forward pass (default: all).
    compile: how the decode step runs, "off" (eager), "inductor", "cudagraph" or "auto" (by device);
    see `andy_dist.infer.decode`. Off by default here, as for the samples shown during training;
    tools/generate.py defaults to "auto".
    valid_vocab: only ids below it are generated (the tokenizer's size); default the model's vocabulary.
    """
    models = _as_list(model)
    decoders = [decoder_for(m, compile) for m in models]
    max_len = min(m.cfg.max_seq_len for m in models)
    vocab = _check_request(models[0].cfg.vocab_size, max_len, prompts, batch_size, valid_vocab)
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
        return results
    generator = None
    if seed is not None:
        generator = torch.Generator(device=_device(models[0])).manual_seed(seed)
    # Rows still to run: (index, tokens so far, tokens still allowed, leading tokens the penalty ignores).
    pending = [(i, list(p), min(max_new_tokens, max_len - len(p)), 0 if sampling.penalize_prompt else len(p))
               for i, p in enumerate(prompts)]
    while pending:
        pending.sort(key=lambda row: -len(row[1]))  # similar lengths together: little padding
        size = batch_size or len(pending)
        still = []
        for start in range(0, len(pending), size):
            batch = pending[start : start + size]
            new, done = _generate_batch(decoders, [b[1] for b in batch], [b[2] for b in batch], sampling,
                                        eos_id, generator, [b[3] for b in batch], vocab)
            for (i, seq, left, skip), tokens, finished in zip(batch, new, done):
                results[i].extend(tokens)
                if not finished and len(tokens) < left and (not tokens or tokens[-1] != eos_id):
                    still.append((i, seq + tokens, left - len(tokens), skip))
        pending = still
    return results


def generate_text(
    model: Models,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    sampling: SamplingConfig = SamplingConfig(),
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    compile: str = "off",
) -> list[str]:
    """Text in, text out: each prompt is encoded with BOS, and only the continuation is returned (only ids
    the tokenizer has are generated)."""
    ids = tokenizer.encode_batch(prompts, bos=True)
    new = generate(model, ids, max_new_tokens, sampling, seed=seed, batch_size=batch_size, compile=compile,
                   valid_vocab=tokenizer.vocab_size)
    return [tokenizer.decode(tokens) for tokens in new]
