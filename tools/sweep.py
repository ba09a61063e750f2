#!/usr/bin/env python
"""Hyper-parameter search with Optuna, each trial a real training run: see andy_dist/sweep/cli.py.

    python tools/sweep.py --space sweeps/tiny.yaml --data shards/NAME --out sweeps/NAME --trials 20
    python tools/sweep.py --summary sweeps/NAME
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    run_tool(main)
