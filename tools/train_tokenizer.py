#!/usr/bin/env python
"""The same program as andy_dist/commands/train_tokenizer.py (see its docstring, or --help)."""

from andy_dist.commands.train_tokenizer import run

if __name__ == "__main__":
    run()
