#!/usr/bin/env python
"""Export a training checkpoint as one model file (no DeepSpeed or GPU needed to run it).

    python tools/export.py --int8 runs/NAME/checkpoints [--tag best|latest|TAG] -o model.andy
    python tools/export.py --bf16 runs/NAME/checkpoints -o model-bf16.andy      # or --fp16 / --fp32

Reads DeepSpeed checkpoints of ZeRO stages 0-3 saved by any number of ranks, in this one process.
The file holds the weights (int8 + per-row scales, or float), the model config, the tokenizer, the
special ids, the quantization scheme, a format version and the checkpoint's identity.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="runs/NAME/checkpoints (or runs/NAME)")
    parser.add_argument("--tag", default="latest", help="best, latest (the 'latest' file) or a tag name")
    dtype = parser.add_mutually_exclusive_group()
    for name in ("int8", "bf16", "fp16", "fp32"):
        dtype.add_argument(f"--{name}", dest="dtype", action="store_const", const=name)
    parser.add_argument("--float-embeddings", action="store_true",
                        help="with --int8: keep the embedding and LM head in fp32 (larger file)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    parser.add_argument("-o", "--output", required=True, help="the model file to write, e.g. model.andy")
    args = parser.parse_args()

    from andy_dist import UserError
    from andy_dist.cli import check_output_path
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.infer.export import load_logical_weights
    from andy_dist.infer.model_file import save_model_file
    from andy_dist.train.checkpoint_format import TOKENIZER_FILE, read_meta, resolve_checkpoint

    dtype = args.dtype or "int8"
    check_output_path(args.output, "-o")  # before the minutes of reading a large checkpoint
    ckpt, tag = resolve_checkpoint(args.checkpoints, args.tag)
    tokenizer = Tokenizer.from_file(args.tokenizer or ckpt / TOKENIZER_FILE)
    trained_with = read_meta(ckpt / tag).get("tokenizer_sha256")
    if trained_with and tokenizer.sha256 != trained_with:
        raise UserError(f"tokenizer {args.tokenizer or ckpt / TOKENIZER_FILE} is not the one this checkpoint "
                        f"was trained with (sha256 differs); pass the run's tokenizer with --tokenizer")
    # The file holds the rows of the tokenizer's ids only: no padding, and none of a larger model vocabulary.
    state, cfg, meta = load_logical_weights(args.checkpoints, args.tag, vocab_size=tokenizer.vocab_size)
    source = {k: meta.get(k) for k in ("checkpoint", "tag", "step", "zero_stage", "world_size", "precision")}
    path = save_model_file(args.output, state, cfg, tokenizer, dtype=dtype, source=source,
                           quantize_embeddings=not args.float_embeddings)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {dtype}) from {meta['checkpoint']} tag {meta['tag']} "
          f"step {meta.get('step')}")
    return 0


if __name__ == "__main__":
    from andy_dist.cli import run_tool

    run_tool(main)
