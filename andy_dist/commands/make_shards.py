"""Tokenize text into WebDataset tar shards for training (see andy_dist/data/shard_writer.py for the format).

    andy-shards --input PATH [PATH ...] --tokenizer DIR/tokenizer.model --out shards/NAME
        [--val-fraction F] [--shard-size-mb M] [--workers N] [--max-seq-len 512] [cleaning options]
    (or: python tools/make_shards.py ...)

PATH: a .txt file (one document), a .jsonl file (one {"text": ...} per line), a directory or a glob.
Documents are cleaned first (andy_dist/data/cleaning.py: Unicode normalisation; empty, too short,
letter-poor, garbled, duplicate and near-duplicate documents are dropped; the summary counts each
rule); train the tokenizer with the same cleaning options. Documents longer than --max-seq-len tokens
(BOS and EOS included) are cut into nearly equal pieces. Reruns give byte-identical shards.
The shard set keeps a copy of the tokenizer (shards/NAME/tokenizer.model), so training needs only --data.
"""

import argparse
import time

from andy_dist.cli import run_tool


def main(argv=None) -> int:
    from andy_dist.data.cleaning import add_cleaning_arguments, options_from_args
    from andy_dist.data.shard_writer import summary, write_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files, directories or globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model (or its directory)")
    parser.add_argument("--out", required=True, help="output directory, e.g. shards/NAME (replaced if it is one)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents for validation, chosen deterministically (default 0.01)")
    parser.add_argument("--shard-size-mb", type=float, default=64.0, help="target size of one tar shard")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    parser.add_argument("--max-seq-len", type=int, default=512,
                        help="longest sample in tokens, BOS/EOS included; longer documents are cut")
    add_cleaning_arguments(parser)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    start = time.time()
    manifest = write_shards(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            shard_size_mb=args.shard_size_mb, workers=args.workers, max_seq_len=args.max_seq_len,
                            cleaning=options)
    seconds = time.time() - start
    print(summary(manifest))
    megabytes = manifest["stats"]["bytes_in"] / 1e6
    print(f"wrote {args.out} in {seconds:.1f}s ({megabytes / max(seconds, 1e-9):.2f} MB/s of text)")
    return 0


def run() -> None:
    run_tool(main)
