"""Batch planning (andy_dist.data.batch_plan) on its own: pure arithmetic on sample lengths.

The plan as the stream uses it (epoch order, buckets, micro-batches on real shards) is tested in test_stream.py.
"""

import numpy as np
import pytest

from andy_dist.data.batch_plan import BatchPlanner, EpochOrder, assign_to_ranks, balanced_partition


def test_balanced_partition():
    lengths = np.array([2, 2, 2, 2, 2, 2, 10, 10])
    assert balanced_partition(lengths, 2) == [0, 6, 8]  # 6 x 2 = 12 and 2 x 10 = 20, not 4 x 2 / 4 x 10
    assert balanced_partition(np.array([5] * 8), 4) == [0, 2, 4, 6, 8]  # equal lengths: equal rows
    assert len(balanced_partition(np.array([5] * 8), 8)) == 9  # every part non-empty
    with pytest.raises(ValueError):
        balanced_partition(np.array([5, 5]), 3)


def test_assign_to_ranks_deals_equal_counts_and_balances_cost():
    assert assign_to_ranks([10, 10, 10, 40], 2) == [[2, 3], [0, 1]]  # 40 + 10 against 10 + 10: the best with 2 each
    assert assign_to_ranks([1, 2, 3, 4, 5, 6], 3) == [[0, 5], [1, 4], [2, 3]]  # 7 each
    with pytest.raises(ValueError):
        assign_to_ranks([1, 2, 3], 2)


def _padded_and_real_per_rank(planner: BatchPlanner, lengths: np.ndarray, step: int) -> tuple[list, list]:
    plan = planner.plan(0, step * planner.global_batch, step)
    padded, real = [], []
    for rank in range(planner.world_size):
        groups = plan.for_rank(rank, planner.world_size)
        assert len(groups) == planner.grad_accum  # every rank the same number of micro-batches
        padded.append(sum(len(g) * int(lengths[g].max()) for g in groups))
        real.append(sum(int(lengths[g].sum()) for g in groups))
    ids = np.concatenate([g for r in range(planner.world_size) for g in plan.for_rank(r, planner.world_size)])
    assert sorted(ids.tolist()) == sorted(plan.sample_ids.tolist())  # each sample of the step exactly once
    return padded, real


@pytest.mark.parametrize("world,accum", [(2, 1), (4, 2)])
def test_no_rank_is_always_the_straggler(world, accum):
    """Mixed lengths (short documents and 512-token pieces): the rank with the most padded tokens, the one
    every step waits for, changes from step to step, and the spread between ranks is small. (Micro-batch
    j of the length-sorted step used to go to rank j mod W: the last rank had the longest rows every step.)"""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(4.5, 1.0, 4096).astype(np.int64) + 2, 512)
    order = EpochOrder(np.full(64, 64), seed=0)
    planner = BatchPlanner(lengths, order, world, micro_batch_size=8, grad_accum=accum, max_seq_len=512)
    slowest, spreads = [], []
    for step in range(40):
        padded, real = _padded_and_real_per_rank(planner, lengths, step)
        slowest.append(int(np.argmax(padded)))
        spreads.append((max(padded) - min(padded)) / np.mean(padded))
    assert max(np.bincount(slowest)) <= 0.6 * len(slowest), slowest  # the straggler changes
    assert np.mean(spreads) < 0.25, np.mean(spreads)
