"""Sample id -> (shard, index in shard) in O(shards) memory.

streaming's ``Spanner`` builds its lookup table with ``np.repeat`` over every sample: 8 bytes
per sample, so a 1.2e9-sample mixture needs ~10 GB just to construct the dataset. This one
keeps only the shard boundaries and answers with a binary search (about a microsecond), so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["ShardSpanner"]


class ShardSpanner:
    """Drop-in for ``streaming.base.spanner.Spanner``."""

    def __init__(self, shard_sizes: NDArray[np.int64], span_size: int = 1 << 10) -> None:
        del span_size  # part of streaming's signature; not needed here
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard_bounds = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.num_samples = int(self.shard_bounds[-1])

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1
        return shard, int(index - self.shard_bounds[shard])
