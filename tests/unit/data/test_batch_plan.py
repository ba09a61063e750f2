"""Batch planning (andy_dist.data.batch_plan) on its own: pure arithmetic on sample lengths.

The plan as the stream uses it (epoch order, buckets, micro-batches on real shards) is tested in test_stream.py.
"""

import numpy as np

from andy_dist.data.batch_plan import balanced_partition


def test_balanced_partition():
    lengths = np.array([2, 2, 2, 2, 2, 2, 10, 10])
    bounds = balanced_partition(lengths, 2, budget=100)
    assert bounds == [0, 6, 8]  # 6 x 2 = 12 and 2 x 10 = 20, not 4 x 2 / 4 x 10
    assert balanced_partition(lengths, 4, budget=None) == [0, 2, 4, 6, 8]
    assert len(balanced_partition(np.array([5] * 8), 8, budget=40)) == 9  # every part non-empty
