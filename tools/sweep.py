#!/usr/bin/env python
"""The same program as andy_dist/commands/sweep.py (see andy_dist/sweep/cli.py, or --help)."""

from andy_dist.commands.sweep import run

if __name__ == "__main__":
    run()
