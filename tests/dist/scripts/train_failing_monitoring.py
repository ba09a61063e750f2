"""launch/train.py with monitoring that fails (run by tests/e2e/test_vocab.py under torchrun).

Injected on every rank before training starts:
    the tokenizer's decode raises, as SentencePiece does for an id it lacks: every training sample fails;
    rank 0's metrics logger raises at each validation, as a lost W&B service or metrics file would.
Each failure must cost one warning line, never the run, its evaluations or its final checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.data.tokenizer import Tokenizer  # noqa: E402
from andy_dist.train.metrics import MetricsLogger  # noqa: E402
from andy_dist.train.run import train  # noqa: E402

_log = MetricsLogger.log


def _decode_fails(self, ids):
    raise IndexError("OUT_OF_RANGE: piece id is out of range (injected)")


def _log_fails_at_validation(self, step, values):
    if self.is_main and "val/loss" in values:  # rank 0 is the logger; elsewhere log() does nothing
        raise OSError("injected: the metrics sink is gone")
    _log(self, step, values)


if __name__ == "__main__":
    Tokenizer.decode = _decode_fails
    MetricsLogger.log = _log_fails_at_validation
    run_tool(train)
