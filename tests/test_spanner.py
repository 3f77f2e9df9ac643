"""ShardSpanner agrees with streaming's Spanner without its O(samples) table."""

from __future__ import annotations

import numpy as np
import pytest
from streaming.base.spanner import Spanner

from mixstream.spanner import ShardSpanner


def test_matches_streaming_spanner_everywhere() -> None:
    sizes = np.array([5, 1, 1030, 7, 2048, 3], dtype=np.int64)
    ours, theirs = ShardSpanner(sizes.copy()), Spanner(sizes.copy())
    for index in range(int(sizes.sum())):
        assert ours[index] == theirs[index]
    for bad in (-1, int(sizes.sum())):
        with pytest.raises(IndexError):
            ours[bad]


def test_huge_index_costs_only_its_shards() -> None:
    sizes = np.full(100_000, 10**5, dtype=np.int64)  # 1e10 samples
    spanner = ShardSpanner(sizes)
    assert spanner.shard_bounds.nbytes < 1_000_000
    assert spanner[10**10 - 1] == (99_999, 10**5 - 1)
    assert spanner[123_456_789] == (1234, 56_789)
