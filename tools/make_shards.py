#!/usr/bin/env python
"""The same program as andy_dist/commands/make_shards.py (see its docstring, or --help)."""

from andy_dist.commands.make_shards import run

if __name__ == "__main__":
    run()
