"""The shared LMO core: the EG step (log space), smoothing, EMA, the mixing laws, A's solve."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixstream.algorithms.lmo import (
    ema,
    exponentiated_gradient_log_step,
    exponentiated_gradient_step,
    floor_probabilities,
    linear_dynamic_law,
    log_linear_static_law,
    normalize_mixing_matrix,
    smooth_toward_uniform,
    solve_mixing_matrix,
)


def test_eg_step_two_groups_by_hand() -> None:
    # p ∝ [0.5 * exp(ln3 * 1), 0.5 * exp(0)] = [1.5, 0.5] -> [0.75, 0.25]
    p = exponentiated_gradient_step([0.5, 0.5], [1.0, 0.0], eta=math.log(3))
    np.testing.assert_allclose(p, [0.75, 0.25], rtol=1e-12)
    # smoothing 0.2: 0.8 * [0.75, 0.25] + 0.2 / 2 = [0.7, 0.3]
    p = exponentiated_gradient_step([0.5, 0.5], [1.0, 0.0], eta=math.log(3), smoothing=0.2)
    np.testing.assert_allclose(p, [0.7, 0.3], rtol=1e-12)


def test_eg_step_three_groups_by_hand() -> None:
    # grad = [0, ln2, -ln2], eta = 1: p ∝ [0.2*1, 0.3*2, 0.5*0.5] = [0.2, 0.6, 0.25], sum 1.05
    p = exponentiated_gradient_step([0.2, 0.3, 0.5], [0.0, math.log(2), -math.log(2)], eta=1.0)
    np.testing.assert_allclose(p, [0.2 / 1.05, 0.6 / 1.05, 0.25 / 1.05], rtol=1e-12)


def test_eg_step_is_shift_invariant_and_keeps_zeros() -> None:
    # Adding a constant to every grad multiplies every weight by the same factor.
    a = exponentiated_gradient_step([0.2, 0.3, 0.5], [1.0, 2.0, 3.0], eta=0.7)
    b = exponentiated_gradient_step([0.2, 0.3, 0.5], [101.0, 102.0, 103.0], eta=0.7)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    # A zero weight stays zero (log 0 = -inf) unless smoothing gives it c/m.
    p = exponentiated_gradient_step([0.0, 1.0], [5.0, 0.0], eta=1.0)
    np.testing.assert_array_equal(p, [0.0, 1.0])
    p = exponentiated_gradient_step([0.0, 1.0], [5.0, 0.0], eta=1.0, smoothing=0.1)
    np.testing.assert_allclose(p, [0.05, 0.95])


@pytest.mark.parametrize(
    ("scale", "expected"),
    [(1e6, [1.0, 0.0, 0.0]), (1e300, [1.0, 0.0, 0.0]), (-1e6, [0.0, 1 / 3, 2 / 3])],
)
def test_eg_step_huge_inputs_do_not_overflow(scale: float, expected: list[float]) -> None:
    # exp(1e6) is inf in float64; in log space the answer is one-hot (or, for -1e6, group 0
    # drops out and the others keep their ratio 0.25 : 0.5).
    p = exponentiated_gradient_step([0.25, 0.25, 0.5], [scale, 0.0, 0.0], eta=1.0)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, expected, atol=1e-12)
    # With smoothing 0.03 every weight keeps its floor 0.03 / 3 = 0.01, in log space too.
    log_p = exponentiated_gradient_log_step(np.log([0.25, 0.25, 0.5]), [scale, 0, 0], 1.0, 0.03)
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(np.exp(log_p).min(), 0.01, rtol=1e-9)
    np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, rtol=1e-12)


def test_eg_step_overflowing_eta_times_grad_is_an_error() -> None:
    with pytest.raises(ValueError, match="overflows"):
        exponentiated_gradient_step([0.5, 0.5], [1e300, 0.0], eta=1e300)


@pytest.mark.parametrize(
    ("p", "grad", "eta", "smoothing", "message"),
    [
        ([0.5, 0.5], [1, 0], 0.0, 0.0, "eta must be a finite number > 0"),
        ([0.5, 0.5], [1, 0], -1.0, 0.0, "eta must be a finite number > 0"),
        ([0.5, 0.5], [1, 0], math.nan, 0.0, "eta must be a finite number > 0"),
        ([0.5, 0.5], [1, 0], 1.0, 1.5, "smoothing must be in [0, 1]"),
        ([0.5, 0.6], [1, 0], 1.0, 0.0, "must sum to 1"),
        ([1.5, -0.5], [1, 0], 1.0, 0.0, "must be >= 0"),
        ([0.5, math.nan], [1, 0], 1.0, 0.0, "must be finite"),
        ([0.5, 0.5], [1, math.nan], 1.0, 0.0, "grad must be finite"),
        ([0.5, 0.5], [1, 0, 0], 1.0, 0.0, "grad has shape (3,)"),
        ([[0.5, 0.5]], [1, 0], 1.0, 0.0, "must have 1 dimension"),
    ],
)
def test_eg_step_bad_inputs(
    p: object, grad: object, eta: float, smoothing: float, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        exponentiated_gradient_step(p, grad, eta, smoothing)
    assert message in str(info.value)


def test_smooth_toward_uniform_by_hand() -> None:
    # 0.9 * [1, 0, 0, 0] + 0.1 / 4 = [0.925, 0.025, 0.025, 0.025]
    np.testing.assert_allclose(
        smooth_toward_uniform([1.0, 0.0, 0.0, 0.0], 0.1), [0.925, 0.025, 0.025, 0.025]
    )
    with pytest.raises(ValueError, match="smoothing"):
        smooth_toward_uniform([1.0, 0.0], -0.1)


def test_ema_by_hand() -> None:
    # decay weighs the previous value: 0.25 * [4, 0] + 0.75 * [0, 8] = [1, 6]
    np.testing.assert_allclose(ema([4.0, 0.0], [0.0, 8.0], 0.25), [1.0, 6.0])
    np.testing.assert_allclose(ema(None, [[1.0, 2.0]], 0.9), [[1.0, 2.0]])  # first value
    np.testing.assert_allclose(ema([1.0], [3.0], 0.0), [3.0])  # no smoothing
    with pytest.raises(ValueError, match="decay"):
        ema([1.0], [2.0], 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema([1.0, 2.0], [2.0], 0.5)


def test_linear_dynamic_law_by_hand() -> None:
    # L - A p = [3, 2] - [[1, 2], [0, 4]] @ [0.25, 0.75] = [3 - 1.75, 2 - 3] = [1.25, -1]
    out = linear_dynamic_law([3.0, 2.0], [[1.0, 2.0], [0.0, 4.0]], [0.25, 0.75])
    np.testing.assert_allclose(out, [1.25, -1.0])
    with pytest.raises(ValueError, match="rows"):
        linear_dynamic_law([3.0, 2.0, 1.0], [[1.0, 2.0], [0.0, 4.0]], [0.25, 0.75])
    with pytest.raises(ValueError, match="columns"):
        linear_dynamic_law([3.0, 2.0], [[1.0], [0.0]], [0.25, 0.75])


def test_log_linear_static_law_by_hand() -> None:
    # c + b exp(-A p): A p = [ln2 * 1, ln4 * 0.5] = [ln2, ln2] -> [1 + 4/2, 2 + 6/2] = [3, 5]
    A = [[math.log(2), 0.0], [0.0, math.log(4)]]
    out = log_linear_static_law([1.0, 2.0], [4.0, 6.0], A, [0.5, 0.5])
    np.testing.assert_allclose(out, [1.0 + 4.0 * 2**-0.5, 2.0 + 6.0 / 2.0])
    out = log_linear_static_law([1.0, 2.0], [4.0, 6.0], A, [1.0, 0.0])
    np.testing.assert_allclose(out, [3.0, 8.0])  # exp(-ln2) = 1/2; exp(0) = 1
    with pytest.raises(ValueError, match="must match"):
        log_linear_static_law([1.0], [4.0, 6.0], A, [0.5, 0.5])


def test_solve_mixing_matrix_by_hand() -> None:
    # W = [[.75, .25], [.25, .75]], A = [[2, 0], [1, 1]]; beta = A W^T:
    # beta[0] = [2*.75 + 0*.25, 2*.25 + 0*.75] = [1.5, 0.5]
    # beta[1] = [1*.75 + 1*.25, 1*.25 + 1*.75] = [1.0, 1.0]
    W = [[0.75, 0.25], [0.25, 0.75]]
    A = solve_mixing_matrix(W, [[1.5, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(A, [[2.0, 0.0], [1.0, 1.0]], atol=1e-12)
    # Non-symmetric W: beta = A W^T still inverts.
    rng = np.random.default_rng(0)
    W2 = rng.dirichlet(np.ones(4), size=4) + np.eye(4)
    A2 = rng.normal(size=(4, 4))
    np.testing.assert_allclose(solve_mixing_matrix(W2, A2 @ W2.T), A2, atol=1e-10)


def test_solve_mixing_matrix_singular_or_bad_shapes() -> None:
    with pytest.raises(ValueError, match="singular"):
        solve_mixing_matrix([[0.5, 0.5], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="square"):
        solve_mixing_matrix([[0.5, 0.5]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="columns"):
        solve_mixing_matrix(np.eye(2), [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        solve_mixing_matrix(np.eye(2), [[1.0, math.nan], [0.0, 0.0]])


def test_normalize_mixing_matrix_by_hand() -> None:
    # Non-negative: divide by the sum, 4: [[2, 0], [1, 1]] / 4
    np.testing.assert_allclose(
        normalize_mixing_matrix([[2.0, 0.0], [1.0, 1.0]]), [[0.5, 0.0], [0.25, 0.25]]
    )
    # Negative min -1: shift to [[2, 0], [1, 3]], sum 6 -> [[1/3, 0], [1/6, 1/2]]
    np.testing.assert_allclose(
        normalize_mixing_matrix([[1.0, -1.0], [0.0, 2.0]]), [[1 / 3, 0.0], [1 / 6, 0.5]]
    )
    # Constant matrix: no preference -> zeros (the EG step then leaves p unchanged).
    np.testing.assert_array_equal(normalize_mixing_matrix(-np.ones((2, 2))), np.zeros((2, 2)))


def test_floor_raises_small_weights_and_keeps_the_others_ratios() -> None:
    # max([0.7, 0.295, 0.005], 0.05) = [0.7, 0.295, 0.05], sum 1.045
    p = floor_probabilities([0.7, 0.295, 0.005], 0.05)
    np.testing.assert_allclose(p, [0.7 / 1.045, 0.295 / 1.045, 0.05 / 1.045], rtol=1e-12)
    assert p[0] / p[1] == pytest.approx(0.7 / 0.295)
    np.testing.assert_array_equal(floor_probabilities([0.5, 0.5], 0.1), [0.5, 0.5])
    # a raised weight ends a little under the floor: [1, 0.5] / 1.5
    np.testing.assert_allclose(floor_probabilities([1.0, 0.0], 0.5), [2 / 3, 1 / 3])
    with pytest.raises(ValueError, match=r"floor=0\.6 is more than 1/m"):
        floor_probabilities([0.5, 0.5], 0.6)
    with pytest.raises(ValueError, match="floor must be in"):
        floor_probabilities([0.5, 0.5], -0.1)


def test_eg_step_with_full_smoothing_is_uniform() -> None:
    # smoothing = 1 (ODM's first steps, K eps_t = 1): (1 - 1) q + 1/m, not log(0) errors
    np.testing.assert_allclose(exponentiated_gradient_step([0.2, 0.8], [5.0, 0.0], 1.0, 1.0),
                               [0.5, 0.5])  # fmt: skip
    log_p = exponentiated_gradient_log_step(np.log([0.2, 0.8]), [5.0, 0.0], 1.0, 1.0)
    np.testing.assert_allclose(log_p, np.log([0.5, 0.5]))
