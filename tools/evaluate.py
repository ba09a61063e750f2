#!/usr/bin/env python
"""The same program as andy_dist/commands/evaluate.py (see its docstring, or --help)."""

from andy_dist.commands.evaluate import run

if __name__ == "__main__":
    run()
