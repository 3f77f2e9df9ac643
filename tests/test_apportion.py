"""Carried-deficit apportionment: quota at every batch for fixed weights, bounded otherwise.

Every test here runs twice: on the C rule (``mixstream._quota``) and on the numpy fallback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mixstream.apportion as apportion
from mixstream.apportion import advance_targets, allocate


@pytest.fixture(autouse=True, scope="module", params=["native", "numpy"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Module-scoped (hypothesis rejects function-scoped fixtures), restored afterwards."""
    native = apportion._quota
    if request.param == "numpy":
        apportion._quota = None
    yield request.param
    apportion._quota = native


def test_the_c_rule_is_built() -> None:
    """``pip install -e .`` compiles it (``make test`` does); without a C compiler the numpy
    fallback runs instead, with the same counts, ~10x slower at 1,000 groups."""
    try:
        import mixstream._quota  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"mixstream._quota was not built ({exc}): install a C compiler (gcc) and "
                    "reinstall with pip install -e .")  # fmt: skip


def test_the_c_rule_rejects_what_it_cannot_read() -> None:
    from mixstream import _quota

    t, w = np.zeros(3), np.full(3, 1 / 3)
    with pytest.raises(ValueError, match="differ in length"):
        _quota.allocate(t, np.zeros(2, dtype=np.int64), w, 4)
    with pytest.raises(TypeError, match="counts must be a 1-d contiguous array of 8-byte int"):
        _quota.allocate(t, np.zeros(3), w, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        _quota.allocate(t, np.zeros(3, dtype=np.int64), w, -1)
    with pytest.raises(ValueError, match="no group has a positive weight"):
        _quota.allocate(t, np.zeros(3, dtype=np.int64), np.zeros(3), 4)


def literal(targets: Any, counts: Any, weights: Any, batch_size: int) -> list[int]:
    """The rule as the module docstring states it, one slot and one group at a time."""
    w, t0, c = [float(x) for x in weights], [float(x) for x in targets], [int(x) for x in counts]
    n = [0] * len(w)
    active = [g for g, x in enumerate(w) if x > 0.0]
    for slot in range(1, batch_size + 1):
        best, best_p, fallback, fallback_p = -1, -1.0, -1, -1.0
        for g in active:
            target, have = t0[g] + slot * w[g], c[g] + n[g]
            p = target / (have + 1)
            if have < target:
                if p > best_p:
                    best, best_p = g, p
            elif p > fallback_p:
                fallback, fallback_p = g, p
        n[best if best >= 0 else fallback] += 1
    return n


@pytest.mark.parametrize("m", [64, 65, 200, 1000])
def test_shortlist_allocation_is_the_literal_rule(m: int) -> None:
    """Many groups take the shortlist path; it gives the literal rule's counts bit for bit,
    with skewed, zero and changing weights."""
    rng = np.random.default_rng(m)
    targets, counts = np.zeros(m), np.zeros(m, dtype=np.int64)
    for batch in range(8):
        w = rng.dirichlet(np.full(m, [0.05, 1.0, 20.0][batch % 3]))
        if batch % 4 == 3:
            w[rng.random(m) < 0.5] = 0.0
            w /= w.sum()
        size = [1, 7, 64, 300][batch % 4]
        n = allocate(targets, counts, w, size)
        assert n == literal(targets, counts, w, size)
        targets = advance_targets(targets, w, size)
        counts = counts + np.asarray(n)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 160),
    kind=st.sampled_from(["dirichlet", "uniform", "coarse", "sparse"]),
    batch_size=st.integers(0, 200),
)
def test_every_path_is_the_literal_rule(
    data: st.DataObject, m: int, kind: str, batch_size: int
) -> None:
    """Ties (uniform and coarsely rounded weights), zero weights and carried deficits, over
    every group count: the shortlist's screen may examine more groups, never fewer."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    targets, counts = np.zeros(m), np.zeros(m, dtype=np.int64)
    for _ in range(3):
        if kind == "uniform":
            w = np.full(m, 1.0 / m)
        elif kind == "coarse":
            w = np.round(rng.dirichlet(np.ones(m)), 2) + 1e-3
        else:
            w = rng.dirichlet(np.full(m, 0.3))
            if kind == "sparse":
                w[rng.random(m) < 0.5] = 0.0
                w[rng.integers(m)] += 0.5
        w = w / w.sum()
        n = allocate(targets, counts, w, batch_size)
        assert n == literal(targets, counts, w, batch_size)
        targets = advance_targets(targets, w, batch_size)
        counts = counts + np.asarray(n)


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
