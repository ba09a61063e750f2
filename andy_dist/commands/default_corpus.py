"""Write the built-in corpus: Python standard library source, one document per file, as .jsonl.

    python tools/default_corpus.py --out runs/demo/corpus.jsonl [--max-mb 3]

Every Python install carries this text, so the main job needs no download.
"""

import argparse

from andy_dist.cli import run_tool


def main(argv=None) -> int:
    from andy_dist.data.corpus import write_default_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-mb", type=float, default=3.0)
    args = parser.parse_args(argv)
    path = write_default_corpus(args.out, int(args.max_mb * 1e6))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB of Python standard library source)")
    return 0


def run() -> None:
    run_tool(main)
