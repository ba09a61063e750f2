#!/usr/bin/env python
"""Benchmarks, each a ratio against a baseline measured in the same run.

    python tools/bench.py SECTION [options]      # sections: see --help
    python tools/bench.py all --out bench.json

Each section lives in tools/benchmarks/SECTION.py and exposes `add_arguments(parser)` and
`run(args) -> dict`; the figures are printed and, with --out, written as JSON.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = sorted(p.stem for p in (ROOT / "tools" / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="section", required=True)
    for name in SECTIONS:
        module = importlib.import_module(f"tools.benchmarks.{name}")
        section = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(section)
        section.add_argument("--out", help="write the figures to this JSON file")
        section.set_defaults(module=module)
    args = parser.parse_args()
    figures = args.module.run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from andy_dist.cli import run_tool

    run_tool(main)
