"""Skill-It's pure rule: one update by hand against the published formula
``p_j ∝ prior_j exp(eta sum_i G[j, i] L_i)``, its LMO matrix, the graph from relative
drops, and the state's window and round trip."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from mixstream.algorithms.skillit import (
    SkillItState,
    learn_graph,
    skillit_mixing_matrix,
    skillit_update,
)


def test_one_update_by_hand() -> None:
    # G[0] = [1, 0.5]: training on group 0 helps itself and half as much group 1.
    G = [[1.0, 0.5], [0.0, 1.0]]
    window = [[2.0, 1.0], [1.0, 1.0]]  # the last two evaluations: sum L = [3, 2]
    # G @ L = [1*3 + 0.5*2, 0*3 + 1*2] = [4, 2]; eta = 0.5 -> p ∝ [e^2, e^1]
    p = skillit_update(G, window, eta=0.5)
    assert p[0] == pytest.approx(math.e / (math.e + 1), rel=1e-12)
    assert p.sum() == pytest.approx(1.0)
    # From a prior [0.25, 0.75] instead of uniform: p ∝ [0.25 e^2, 0.75 e]
    p = skillit_update(G, window, eta=0.5, prior=[0.25, 0.75])
    expected = np.array([0.25 * math.e**2, 0.75 * math.e])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)


def test_the_lmo_matrix_column_sums_are_the_exponent() -> None:
    G = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]])
    L = np.array([3.0, 2.0, 4.0])
    A = skillit_mixing_matrix(G, L)
    assert A[1, 0] == pytest.approx(G[0, 1] * L[1])  # A_ij = G[j, i] L_i
    np.testing.assert_allclose(A.sum(axis=0), G @ L)


def test_each_update_restarts_from_the_prior() -> None:
    state = SkillItState(graph=[[1.0, 0.0], [0.0, 1.0]])
    state.record([1.0, 2.0], window=2)
    first = state.update(1.0)
    state.record([1.0, 2.0], window=2)
    second = state.update(1.0)
    # sum of the window is [2, 4]: softmax([2, 4]) from uniform, not first * softmax(...)
    np.testing.assert_allclose(second, np.exp([2, 4]) / np.exp([2, 4]).sum(), rtol=1e-12)
    assert second[1] > first[1]
    state.record([5.0, 0.0], window=2)  # the oldest evaluation leaves the window
    assert state.window == [[1.0, 2.0], [5.0, 0.0]]
    assert state.updates == 2


def test_graph_is_the_relative_drop_floored_at_zero() -> None:
    # Sweeps: group 1, then group 0 (one round). Evaluations before, after sweep 1, after 0.
    order = [1, 0]
    losses = [[4.0, 2.0], [3.0, 1.0], [2.0, 1.1]]
    G = learn_graph(order, losses, rounds=1)
    # training on 1: group 0 went 4 -> 3 (0.25), group 1 went 2 -> 1 (0.5)
    np.testing.assert_allclose(G[1], [0.25, 0.5])
    # training on 0: group 0 went 3 -> 2 (1/3), group 1 rose 1 -> 1.1 (no edge: 0)
    np.testing.assert_allclose(G[0], [1 / 3, 0.0])


def test_state_round_trip() -> None:
    state = SkillItState(graph=[[1.0, 0.1], [0.2, 1.0]], graph_losses=[[1.0, 2.0]])
    state.record([3.0, 4.0], window=3)
    state.update(0.2)
    clone = SkillItState.from_state_dict(state.state_dict())
    assert clone == state
    assert clone.state_dict() == state.state_dict()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: skillit_update([[1.0, -0.1], [0.0, 1.0]], [[1, 1]], 1.0), "must be >= 0"),
        (lambda: skillit_update([[1.0, 0.0], [0.0, 1.0]], [], 1.0), "at least one"),
        (lambda: skillit_update([[1.0, 0.0], [0.0, 1.0]], [[1, 1, 1]], 1.0), "3 losses"),
        (lambda: skillit_update([[1.0, 0.0], [0.0, 1.0]], [[1, 1]], 0.0), "eta must be"),
        (lambda: skillit_update([[1.0]], [[1.0]], 1.0), "skills graph must be"),
        (lambda: SkillItState().update(1.0), "no skills graph yet"),
    ],
)
def test_bad_input_is_refused(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
