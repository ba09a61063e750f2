"""Train the SentencePiece BPE tokenizer (PAD 0, UNK 1, BOS 2, EOS 3) on text files.

    andy-tokenizer --input PATH [PATH ...] --vocab-size N --out DIR [cleaning options]
    (or: python tools/train_tokenizer.py ...)

PATH: a .txt file (one document), a .jsonl file (one {"text": ...} per line), a directory or a glob.
The tokenizer is trained on the documents andy-shards keeps: the same cleaning (Unicode normalisation,
length, character-class, duplicate and near-duplicate rules) with the same options.
"""

import argparse
import time

from andy_dist.cli import run_tool


def main(argv=None) -> int:
    from andy_dist.data.cleaning import CleaningStats, add_cleaning_arguments, cleaned_documents, options_from_args
    from andy_dist.data.corpus import iter_documents, resolve_inputs, total_bytes
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files, directories or globs")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output directory for tokenizer.model and tokenizer.vocab")
    parser.add_argument("--sample-sentences", type=int, default=2_000_000,
                        help="at most this many lines are sampled for training (bounds memory)")
    add_cleaning_arguments(parser)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    files = resolve_inputs(args.input)
    start = time.time()
    stats = CleaningStats()
    model_path = train_tokenizer(cleaned_documents(iter_documents(files), stats, options), args.vocab_size,
                                 args.out, args.sample_sentences)
    tokenizer = Tokenizer.from_file(model_path)
    print(stats.describe())
    print(f"wrote {model_path} ({tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}) "
          f"from {len(files)} file(s), {total_bytes(files) / 1e6:.2f} MB, in {time.time() - start:.1f}s")
    return 0


def run() -> None:
    run_tool(main)
