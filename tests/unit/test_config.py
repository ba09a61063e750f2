"""Batch maths for every world size (andy_dist.config).

Training settings are tests/unit/train/test_settings.py's; the shipped DeepSpeed configs
(andy_dist.train.engine) are tests/unit/train/test_engine.py's.
"""

import pytest

from andy_dist.config import GLOBAL_BATCH_RANGE, ConfigError, resolve_batch


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_batch_maths_table(size, world):
    low, high = GLOBAL_BATCH_RANGE[size]
    if world > high:
        with pytest.raises(ConfigError, match=f"at most {high} ranks"):
            resolve_batch(size, world, 8)
        return
    plan = resolve_batch(size, world, 8)
    assert low <= plan.global_batch_size <= high
    assert plan.global_batch_size == plan.micro_batch_size * plan.grad_accum * world
    assert plan.micro_batch_size <= 8


def test_batch_maths_expected_values():
    assert resolve_batch("tiny", 2, 8).grad_accum == 2  # 8 x 2 x 2 = 32
    assert resolve_batch("tiny", 3, 8).global_batch_size == 48
    assert resolve_batch("medium", 1, 4).grad_accum == 2  # single_gpu_8gb: 4 x 2 = 8
    assert resolve_batch("small", 8, 8).micro_batch_size == 4  # lowered so 8 ranks fit 16-32


def test_explicit_global_batch_and_impossible_ones():
    assert resolve_batch("tiny", 2, 8, global_batch_size=64).grad_accum == 4
    with pytest.raises(ConfigError, match="outside the tiny range"):
        resolve_batch("tiny", 2, 8, global_batch_size=16)
    with pytest.raises(ConfigError, match="micro_batch_size=6 would work"):
        resolve_batch("tiny", 2, 8, global_batch_size=36)
