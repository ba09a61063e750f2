"""Loss, perplexity and bits per byte of a model file (or an ensemble) on held-out data.

    andy-evaluate model.andy --data shards/NAME --split val        (or: python tools/evaluate.py ...)
    andy-evaluate model.andy --data s3://bucket/shards/NAME        # or https://...: fetched into the cache
    andy-evaluate model.andy --text held_out.txt                   # raw text, cut into 512-token windows
    andy-evaluate a.andy --ensemble b.andy --data shards/NAME      # each member and their averaged distribution

Run it on an fp32 and an int8 export of the same checkpoint to see what quantization costs. An ensemble's
perplexity is that of the mean of the members' probabilities (andy_dist/infer/evaluation.py).
"""

import argparse
import json

from andy_dist.cli import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .andy file written by tools/export.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a shard set written by tools/make_shards.py: a folder or a URL")
    source.add_argument("--text", help="a UTF-8 text file")
    parser.add_argument("--split", default="val", choices=["val"], help="the shards' split (val)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="OTHER.andy",
                        help="another model with the same tokenizer: also report the ensemble (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--cache-dir", help="node-local folder for copies of a remote --data (default "
                                            "$ANDY_CACHE_DIR or ~/.cache/andy_dist)")
    parser.add_argument("--storage-options", help="JSON object of fsspec options for a --data URL")
    return parser


def _load_models(args):
    from andy_dist import UserError
    from andy_dist.cli import resolve_device
    from andy_dist.infer.model_file import load_model_file

    device = resolve_device(args.device)
    loaded = [load_model_file(path, device=device) for path in [args.model, *args.ensemble]]
    tokenizer = loaded[0][1]
    for path, (model, member_tok, _) in zip(args.ensemble, loaded[1:]):
        if member_tok.sha256 != tokenizer.sha256:
            raise UserError(f"--ensemble {path} uses another tokenizer than {args.model}; members must share one")
        if model.cfg.max_seq_len != loaded[0][0].cfg.max_seq_len:
            raise UserError(f"--ensemble {path} has another context length than {args.model}")
    return [m for m, _, _ in loaded], tokenizer, [info for _, _, info in loaded]


def _batches(args, models, tokenizer):
    """(batches, text bytes) of the chosen held-out data."""
    from andy_dist import BOS_ID, EOS_ID, UserError
    from andy_dist.cli import read_text_file
    from andy_dist.infer.evaluation import text_batches

    cfg = models[0].cfg
    if args.data:
        from andy_dist.data.remote import parse_storage_options
        from andy_dist.data.shard_cache import DataAccess
        from andy_dist.data.shard_reader import open_shards
        from andy_dist.data.stream import ValStream

        access = DataAccess(cache_dir=args.cache_dir, storage_options=parse_storage_options(args.storage_options))
        shards = open_shards(args.data, tokenizer=tokenizer, vocab_size=cfg.vocab_size, verify="size",
                             access=access)
        stream = ValStream(shards, rank=0, world_size=1, micro_batch_size=args.batch_size, max_seq_len=cfg.max_seq_len)
        return ((mb.input_ids, mb.targets, mb.attention_mask) for mb in stream), stream.text_bytes
    text = read_text_file(args.text, "--text")
    if not text.strip():
        raise UserError(f"--text {args.text} holds no text to evaluate on")
    ids = [BOS_ID] + tokenizer.encode(text) + [EOS_ID]
    return text_batches(ids, cfg.max_seq_len, args.batch_size), len(text.encode("utf-8"))


def _line(name: str, figures: dict) -> str:
    return (f"{name}: loss {figures['loss']:.4f}  perplexity {figures['perplexity']:.3f}  "
            f"bits/byte {figures['bits_per_byte']:.4f}  ({figures['target_tokens']} tokens)")


def main(argv=None) -> int:
    from andy_dist import UserError
    from andy_dist.infer.evaluation import evaluate_models

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    models, tokenizer, infos = _load_models(args)
    batches, text_bytes = _batches(args, models, tokenizer)
    result = evaluate_models(models, batches, text_bytes)
    for path, info, figures in zip([args.model, *args.ensemble], infos, result["members"]):
        figures.update(model=str(path), quantization=info["quantization"]["scheme"])
    if result["ensemble"] is not None:
        result["ensemble"]["model"] = "ensemble of " + ", ".join(f["model"] for f in result["members"])
    if args.json:
        print(json.dumps(result if args.ensemble else result["members"][0], indent=2))
    else:
        for figures in result["members"]:
            print(_line(figures["model"], figures))
        if result["ensemble"] is not None:
            print(_line(f"ensemble of {len(models)}", result["ensemble"]))
    return 0


def run() -> None:
    run_tool(main)
