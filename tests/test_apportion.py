"""Carried-deficit apportionment: quota at every batch for fixed weights, bounded otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixstream.apportion import advance_targets, allocate


def run(schedule: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets and counts after each batch, for one weight vector per batch."""
    m = len(schedule[0])
    targets, counts = np.zeros(m), np.zeros(m, dtype=np.int64)
    history_t, history_c = [], []
    for w in schedule:
        n = allocate(targets, counts, w, batch_size)
        assert sum(n) == batch_size and min(n) >= 0
        assert all(k == 0 for k, x in zip(n, w, strict=True) if x == 0), "weight 0 drawn"
        counts = counts + np.asarray(n)
        targets = advance_targets(targets, w, batch_size)
        history_t.append(targets)
        history_c.append(counts)
    return np.array(history_t), np.array(history_c)


weight_vectors = st.integers(2, 8).flatmap(
    lambda m: st.lists(st.floats(0, 1), min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3)
)


@settings(max_examples=300, deadline=None)
@given(weights=weight_vectors, batch_size=st.integers(1, 32), batches=st.integers(1, 60))
def test_fixed_weights_meet_quota_at_every_batch(
    weights: list[float], batch_size: int, batches: int
) -> None:
    w = np.asarray(weights) / sum(weights)
    targets, counts = run([w] * batches, batch_size)
    assert np.abs(counts - targets).max() <= 1 + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    m=st.integers(2, 6),
    batch_size=st.integers(1, 16),
    batches=st.integers(1, 40),
)
def test_changing_weights_stay_within_two(
    data: st.DataObject, m: int, batch_size: int, batches: int
) -> None:
    """No online rule can keep quota when weights jump; the gap stays bounded and small."""
    vec = st.lists(st.floats(0, 1), min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3)
    schedule = [
        np.asarray(v) / sum(v) for v in data.draw(st.lists(vec, min_size=batches, max_size=batches))
    ]
    targets, counts = run(schedule, batch_size)
    assert np.abs(counts - targets).max() < 2


def test_small_weight_is_drawn_on_schedule() -> None:
    """Weight 0.01 with a global batch of 8 is drawn about once every 12.5 batches."""
    w = np.array([0.99, 0.01])
    _, counts = run([w] * 1000, 8)
    assert counts[-1, 1] == 80
    draws = np.flatnonzero(np.diff(np.concatenate([[0], counts[:, 1]])))
    gaps = np.diff(draws)
    assert gaps.min() >= 12 and gaps.max() <= 13


def test_hand_computed_allocation() -> None:
    # Uniform over 3 groups, batch 4: quota 4/3 each; ties go to the lower index.
    assert allocate([0, 0, 0], [0, 0, 0], [1 / 3] * 3, 4) == [2, 1, 1]
    # The carried deficit of group 2 (behind by 2/3) is served first next batch.
    targets = advance_targets(np.zeros(3), np.full(3, 1 / 3), 4)
    assert allocate(targets, [2, 1, 1], [1 / 3] * 3, 4) == [1, 2, 1]


def test_zero_weight_group_keeps_its_deficit_but_is_not_drawn() -> None:
    targets = np.array([0.0, 0.9])
    assert allocate(targets, [1, 0], [1.0, 0.0], 5) == [5, 0]


def test_no_positive_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        allocate([0, 0], [0, 0], [0.0, 0.0], 4)
