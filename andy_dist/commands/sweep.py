"""Hyper-parameter search with Optuna (`andy-sweep` is `tools/sweep.py`); the program is andy_dist/sweep/cli.py.

    andy-sweep --space sweeps/tiny.yaml --data shards/NAME --out sweeps/NAME --trials 20
    andy-sweep --summary sweeps/NAME
"""

from andy_dist.cli import run_tool


def run() -> None:
    from andy_dist.sweep.cli import main

    run_tool(main)
