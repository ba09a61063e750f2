#!/usr/bin/env python
"""Write the built-in corpus: Python standard library source, one document per file, as .jsonl.

    python tools/default_corpus.py --out runs/demo/corpus.jsonl [--max-mb 3]

Every Python install carries this text, so the main job needs no download.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.data.corpus import write_default_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-mb", type=float, default=3.0)
    args = parser.parse_args()
    path = write_default_corpus(args.out, int(args.max_mb * 1e6))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB of Python standard library source)")
    return 0


if __name__ == "__main__":
    run_tool(main)
