#!/usr/bin/env python
"""Loss, perplexity and bits per byte of a model file on held-out data.

    python tools/evaluate.py model.andy --data shards/NAME --split val
    python tools/evaluate.py model.andy --data s3://bucket/shards/NAME   # or https://...: fetched into the cache
    python tools/evaluate.py model.andy --text held_out.txt          # raw text, cut into 512-token windows

Run it on an fp32 and an int8 export of the same checkpoint to see what quantization costs.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@torch.inference_mode()
def evaluate_batches(model, batches: Iterable, text_bytes: int) -> dict:
    """Summed next-token loss over (input_ids, targets, attention_mask) batches -> the figures."""
    from tqdm import tqdm

    device = model.embed.weight.device
    loss_sum, count = 0.0, 0
    for input_ids, targets, mask in tqdm(batches, desc="evaluate", unit="batch", mininterval=1.0):
        out = model(input_ids.to(device), targets=targets.to(device), attention_mask=mask.to(device))
        loss_sum += float(out.loss_sum)
        count += int(out.target_tokens)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss_sum / math.log(2) / max(text_bytes, 1),
            "target_tokens": count, "text_bytes": text_bytes}


def text_batches(ids: list[int], window: int, batch_size: int = 8):
    """Non-overlapping windows of `window` + 1 tokens -> (input, target, mask) batches (no padding)."""
    rows = [ids[i : i + window + 1] for i in range(0, max(len(ids) - 1, 1), window)]
    rows = [r for r in rows if len(r) > 1]
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        width = max(len(r) for r in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.zeros_like(x)
        for i, r in enumerate(group):
            x[i, : len(r) - 1] = torch.tensor(r[:-1])
            y[i, : len(r) - 1] = torch.tensor(r[1:])
        yield x, y, (x != 0).long()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .andy file written by tools/export.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a shard set written by tools/make_shards.py: a folder or a URL")
    source.add_argument("--text", help="a UTF-8 text file")
    parser.add_argument("--split", default="val", choices=["val"], help="the shards' split (val)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--cache-dir", help="node-local folder for copies of a remote --data (default "
                                            "$ANDY_CACHE_DIR or ~/.cache/andy_dist)")
    parser.add_argument("--storage-options", help="JSON object of fsspec options for a --data URL")
    args = parser.parse_args()

    from andy_dist import BOS_ID, EOS_ID, UserError
    from andy_dist.cli import read_text_file, resolve_device
    from andy_dist.infer.model_file import load_model_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, tokenizer, info = load_model_file(args.model, device=resolve_device(args.device))
    if args.data:
        from andy_dist.data.remote import parse_storage_options
        from andy_dist.data.shard_cache import DataAccess
        from andy_dist.data.shard_reader import open_shards
        from andy_dist.data.stream import ValStream

        access = DataAccess(cache_dir=args.cache_dir, storage_options=parse_storage_options(args.storage_options))
        shards = open_shards(args.data, tokenizer=tokenizer, vocab_size=model.cfg.vocab_size, verify="size",
                             access=access)
        stream = ValStream(shards, rank=0, world_size=1, micro_batch_size=args.batch_size,
                           max_seq_len=model.cfg.max_seq_len)
        batches = ((mb.input_ids, mb.targets, mb.attention_mask) for mb in stream)
        figures = evaluate_batches(model, batches, stream.text_bytes)
    else:
        text = read_text_file(args.text, "--text")
        if not text.strip():
            raise UserError(f"--text {args.text} holds no text to evaluate on")
        ids = [BOS_ID] + tokenizer.encode(text) + [EOS_ID]
        figures = evaluate_batches(model, text_batches(ids, model.cfg.max_seq_len, args.batch_size),
                                   len(text.encode("utf-8")))
    figures["model"] = str(args.model)
    figures["quantization"] = info["quantization"]["scheme"]
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{args.model}: loss {figures['loss']:.4f}  perplexity {figures['perplexity']:.3f}  "
              f"bits/byte {figures['bits_per_byte']:.4f}  ({figures['target_tokens']} tokens)")
    return 0


if __name__ == "__main__":
    from andy_dist.cli import run_tool

    run_tool(main)
