"""Tests for the lazy block shuffle: bijection, determinism, locality, laziness, quality."""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixstream.permutation import BlockShuffle

SIZES = [
    (1, 1),
    (1, 5),
    (2, 1),
    (2, 2),
    (3, 2),
    (5, 1),
    (7, 3),
    (13, 13),
    (16, 4),
    (17, 4),
    (64, 64),
    (97, 10),
    (101, 1000),
    (256, 16),
    (1000, 7),
    (1024, 1),
    (4097, 64),
    (7919, 128),
    (65536, 256),
    (65537, 4096),
]


def _full_pass(s: BlockShuffle) -> np.ndarray:
    return s(np.arange(len(s)))


@pytest.mark.parametrize(("n", "block_size"), SIZES)
def test_bijection(n: int, block_size: int) -> None:
    for epoch in range(3):
        out = _full_pass(BlockShuffle(n, block_size, seed=11, epoch=epoch))
        assert out.dtype == np.int64
        np.testing.assert_array_equal(np.sort(out), np.arange(n))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 3000),
    block_size=st.integers(1, 4000),
    seed=st.integers(-(2**63), 2**64 - 1),
    stream=st.integers(0, 1000),
    epoch=st.integers(0, 1000),
)
def test_bijection_property(n: int, block_size: int, seed: int, stream: int, epoch: int) -> None:
    s = BlockShuffle(n, block_size, seed=seed, stream=stream, epoch=epoch)
    out = _full_pass(s)
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    # The scalar path is an independent pure-Python implementation: it must agree.
    for p in {0, n // 2, n - 1}:
        assert s(p) == out[p]


@pytest.mark.parametrize(("n", "block_size"), [(1, 1), (97, 10), (1000, 7), (4097, 64)])
def test_scalar_matches_vector(n: int, block_size: int) -> None:
    s = BlockShuffle(n, block_size, seed=5, stream=2, epoch=9)
    out = _full_pass(s)
    scalars = [s(p) for p in range(n)]
    assert all(type(x) is int for x in scalars)
    np.testing.assert_array_equal(out, scalars)


def test_array_shapes_and_dtypes() -> None:
    s = BlockShuffle(100, 8, seed=1)
    flat = _full_pass(s)
    grid = s(np.arange(100, dtype=np.uint32).reshape(10, 10))
    assert grid.shape == (10, 10)
    np.testing.assert_array_equal(grid.ravel(), flat)
    np.testing.assert_array_equal(s([3, 4, 5]), flat[3:6])
    assert s(np.int64(7)) == flat[7]
    assert s(np.array([], dtype=np.int64)).shape == (0,)


def test_deterministic_and_keyed() -> None:
    n, bs = 5000, 100
    base = _full_pass(BlockShuffle(n, bs, seed=42, stream=1, epoch=3))
    np.testing.assert_array_equal(base, _full_pass(BlockShuffle(n, bs, seed=42, stream=1, epoch=3)))
    for kwargs in ({"seed": 43}, {"stream": 2}, {"epoch": 4}):
        args = {"seed": 42, "stream": 1, "epoch": 3} | kwargs
        other = _full_pass(BlockShuffle(n, bs, **args))
        # Independent orders agree on about n / bs positions (same block slot, same offset).
        assert np.count_nonzero(other == base) < n // 10, kwargs


def test_pinned_values() -> None:
    """Guards against accidental changes to the order, which would break resumed runs."""
    s = BlockShuffle(20, 6, seed=0)
    np.testing.assert_array_equal(
        _full_pass(s), [5, 1, 4, 2, 3, 0, 13, 14, 16, 12, 15, 17, 11, 9, 6, 10, 7, 8, 18, 19]
    )


@pytest.mark.parametrize(
    ("n", "block_size"), [(1000, 10), (1003, 10), (4099, 64), (64, 64), (5000, 30), (20, 6)]
)
def test_locality(n: int, block_size: int) -> None:
    """Each block's ids occupy one run of consecutive positions, of the block's length."""
    for seed in range(5):
        out = _full_pass(BlockShuffle(n, block_size, seed=seed))
        blocks = out // block_size
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        lengths = np.diff(np.r_[starts, n])
        run_blocks = blocks[starts]
        assert len(np.unique(run_blocks)) == len(run_blocks) == -(-n // block_size)
        expected = np.minimum(block_size, n - run_blocks * block_size)
        np.testing.assert_array_equal(lengths, expected)


def test_short_block_position_varies() -> None:
    """The short block is inserted at a keyed slot, not always at the end of the pass."""
    n, bs = 1005, 10
    starts = set()
    for epoch in range(20):
        out = _full_pass(BlockShuffle(n, bs, seed=0, epoch=epoch))
        starts.add(int(np.flatnonzero(out >= 1000)[0]))
    assert len(starts) > 10
    assert all(s % bs == 0 for s in starts)


def test_lazy_huge() -> None:
    n = 2**40
    s = BlockShuffle(n, 2**20 + 3, seed=123, epoch=7)
    positions = np.array([0, 1, 2**20, 2**39, n - 2, n - 1], dtype=np.int64)
    start = time.perf_counter()
    out = s(positions)
    scalars = [s(int(p)) for p in positions]
    assert time.perf_counter() - start < 0.5
    assert ((out >= 0) & (out < n)).all()
    assert len(set(out.tolist())) == len(out)
    np.testing.assert_array_equal(out, scalars)
    assert len(s) == n
    # Positions straddling block boundaries stay consistent too.
    window = np.arange(2**39 - 5000, 2**39 + 5000, dtype=np.int64)
    np.testing.assert_array_equal(s(window)[::997], [s(int(p)) for p in window[::997]])


def test_shuffle_quality() -> None:
    n = 10_000
    for seed in range(3):
        out = _full_pass(BlockShuffle(n, n, seed=seed)).astype(np.float64)
        positions = np.arange(n, dtype=np.float64)
        # A uniform permutation has ~Poisson(1) fixed points.
        assert np.count_nonzero(out == positions) <= 8
        assert abs(np.corrcoef(positions, out)[0, 1]) < 0.05
        assert abs(np.corrcoef(out[:-1], out[1:])[0, 1]) < 0.05
        # Adjacent positions should not map to near-adjacent ids.
        assert np.mean(np.abs(np.diff(out)) <= 10) < 0.01
        # Each tenth of the pass draws evenly from each tenth of the ids.
        counts = np.histogram2d(positions, out, bins=10)[0]
        assert counts.min() > 60 and counts.max() < 140


def test_block_order_quality() -> None:
    """The block order itself is shuffled, not just the samples inside each block."""
    out = _full_pass(BlockShuffle(100_000, 100, seed=9))
    order = out[::100] // 100
    assert abs(np.corrcoef(np.arange(len(order)), order)[0, 1]) < 0.1


@pytest.mark.parametrize(("n", "block_size"), [(1, 1), (10, 3), (100, 1000)])
def test_no_shuffle_is_identity(n: int, block_size: int) -> None:
    s = BlockShuffle(n, block_size, seed=1, epoch=5, shuffle=False)
    np.testing.assert_array_equal(_full_pass(s), np.arange(n))
    assert s(n - 1) == n - 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        BlockShuffle(0, 10, seed=0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockShuffle(10, 0, seed=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        BlockShuffle(10, 2, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="stream must be >= 0"):
        BlockShuffle(10, 2, seed=0, stream=-1)
    with pytest.raises(TypeError, match="num_samples must be an integer"):
        BlockShuffle(10.0, 2, seed=0)  # type: ignore[arg-type]

    s = BlockShuffle(10, 3, seed=0)
    for bad in (10, -1, 2**70):
        with pytest.raises(IndexError, match=f"position {bad} out of range"):
            s(bad)
    with pytest.raises(IndexError, match="position 10 out of range"):
        s(np.array([0, 10]))
    with pytest.raises(IndexError, match="position -3 out of range"):
        s(np.array([-3, 2]))
    with pytest.raises(TypeError, match="positions must be integers"):
        s(np.array([0.5]))


@pytest.mark.parametrize("n", [4, 5])
def test_tiny_domains_uniform(n: int) -> None:
    """Permutations of <= 16 values (tiny groups, short blocks) reach every order evenly.

    Feistel + cycle walking fails this for n=5 (only even permutations of the 16-value domain).
    """
    trials = {4: 10_000, 5: 30_000}[n]
    orders = Counter(tuple(_full_pass(BlockShuffle(n, n, seed=s)).tolist()) for s in range(trials))
    cells = math.factorial(n)
    assert len(orders) == cells
    expected = trials / cells
    chi2 = sum((c - expected) ** 2 / expected for c in orders.values())
    # ~p = 1e-4 thresholds for 23 and 119 degrees of freedom; Feistel scores ~250 for n=5.
    assert chi2 < {4: 60, 5: 190}[n]
