#!/usr/bin/env python
"""The same program as andy_dist/commands/default_corpus.py (see its docstring, or --help)."""

from andy_dist.commands.default_corpus import run

if __name__ == "__main__":
    run()
