#!/usr/bin/env python
"""Benchmarks, each a ratio against a baseline measured in the same run.

    python tools/bench.py SECTION [options]   # compile, data, engine, generate, mfu, overhead, sweep, train
    python tools/bench.py SECTION --help

Each section lives in tools/benchmarks/SECTION.py and exposes `add_arguments(parser)` and
`run(args) -> dict`; the figures are printed and, with --out, written as JSON. Only the section
asked for is imported, so a machine lacking one section's packages can still run the others.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

# Run as a script, this file's folder (tools/) comes first on sys.path, so the sections import as `benchmarks.*`.
SECTIONS = sorted(p.stem for p in (Path(__file__).resolve().parent / "benchmarks").glob("*.py")
                  if not p.stem.startswith("_"))


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SECTIONS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nsections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2
    name = sys.argv[1]
    module = importlib.import_module(f"benchmarks.{name}")
    parser = argparse.ArgumentParser(prog=f"bench.py {name}", description=module.__doc__)
    module.add_arguments(parser)
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(sys.argv[2:])
    figures = module.run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from andy_dist.cli import run_tool

    run_tool(main)
