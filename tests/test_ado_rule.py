"""ADO's pure rule: the power-law fit, the preference and the time-smoothed policy, by hand
against the reference's update (yidingjiang/ado, AdoSelector)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixstream.algorithms.ado import (
    ADOConfig,
    ADOState,
    PowerLaw,
    ado_policy,
    ado_preference,
    ado_update,
    fit_power_law,
)


# ------------------------------------------------------------------------------ the fit
@pytest.mark.parametrize("alpha", [0.3, 0.37, 0.061])  # on the grid (0.8 * 60/160) and off it
def test_fit_recovers_a_planted_law(alpha: float) -> None:
    n = np.arange(1, 301) * 512.0
    law = PowerLaw(eps=2.0, beta=30.0, alpha=alpha)
    fit = fit_power_law(n, law(n))
    assert fit is not None
    assert fit.alpha == pytest.approx(alpha, abs=1e-6)
    assert fit.eps == pytest.approx(2.0, abs=1e-4)
    np.testing.assert_allclose(fit(n), law(n), rtol=1e-6)


def test_fit_is_robust_to_noise_and_leaves_out_absent_points() -> None:
    rng = np.random.default_rng(0)
    n = np.arange(1, 501) * 1000.0
    law = PowerLaw(eps=1.5, beta=40.0, alpha=0.4)
    y = law(n) + rng.normal(0, 0.02, n.size)
    y[::7] = math.nan  # a group absent from those batches
    fit = fit_power_law(n, y)
    assert fit is not None and abs(fit.alpha - 0.4) < 0.05
    np.testing.assert_allclose(fit(n[-100:]), law(n[-100:]), atol=0.01)
    assert fit_power_law([1.0, 2.0, 3.0], [1.0, math.nan, 0.5]) is None  # 2 points
    assert fit_power_law([1.0, 2.0], [1.0, 0.5]) is None


def test_fit_bounds_a_rising_loss_is_flat() -> None:
    n = np.arange(1, 51, dtype=np.float64)
    rising = 2.0 + 0.01 * n  # no power law decreases here: beta = 0, L = mean
    fit = fit_power_law(n, rising)
    assert fit is not None and fit.beta == 0.0 and fit.eps == pytest.approx(rising.mean())
    assert fit.rate(100.0, min_exponent=0.05) == 0.0
    steep = 0.1 + 5.0 / n**1.5  # steeper than max_exponent: alpha at its bound
    fit = fit_power_law(n, steep)
    assert fit is not None and fit.eps >= 0 and fit.beta >= 0 and fit.alpha == 0.8


# ---------------------------------------------------------------------------- the policy
def test_one_update_by_hand() -> None:
    # Two groups with fitted laws, n = 100 (all data seen, counts="total"), prior uniform,
    # credit h = [0.64, 0.36] (s = 0.5: sqrt h = [0.8, 0.6]).
    laws = [PowerLaw(eps=1.0, beta=8.0, alpha=0.5), PowerLaw(eps=2.0, beta=4.0, alpha=0.02)]
    rho, rates = ado_preference(laws, [100.0, 100.0], [0.5, 0.5], [0.64, 0.36])
    # -dL/dn = a (L(n) - eps) / n, a = max(alpha, 0.05):
    # group 0: 0.5 * (8 / sqrt(100)) / 100 = 0.004
    # group 1: 0.05 * (4 * 100^-0.02) / 100 (its alpha 0.02 is raised to 0.05 in the rate)
    r1 = 0.05 * 4.0 * 100.0**-0.02 / 100.0
    np.testing.assert_allclose(rates, [0.004, r1], rtol=1e-12)
    score = np.array([0.004 * 0.5 * 0.8, r1 * 0.5 * 0.6])
    np.testing.assert_allclose(rho, score / score.sum(), rtol=1e-12)  # both above the floor
    # pi = 0.9 avg + 0.1 rho; at t = 9 the average takes rho at 1/(t+1) = 0.1 too
    pi, average = ado_policy([0.5, 0.5], rho, step=9, policy_ema=0.9)
    np.testing.assert_allclose(pi, 0.9 * 0.5 + 0.1 * rho, rtol=1e-12)
    np.testing.assert_allclose(average, 0.9 * 0.5 + 0.1 * rho, rtol=1e-12)
    previous = average
    pi, average = ado_policy(previous, [0.2, 0.8], step=19, policy_ema=0.5)
    np.testing.assert_allclose(pi, 0.5 * previous + 0.5 * np.array([0.2, 0.8]))
    np.testing.assert_allclose(average * 20, previous * 19 + [0.2, 0.8])


def test_preference_floor_prior_and_flat_laws() -> None:
    flat = PowerLaw(eps=2.0, beta=0.0, alpha=0.3)
    steep = PowerLaw(eps=1.0, beta=10.0, alpha=0.5)
    # a flat law gets the floor: max([1, 0], 0.05) / 1.05
    rho, _ = ado_preference([steep, flat], [10.0, 10.0], [0.5, 0.5], [0.5, 0.5], min_prob=0.05)
    np.testing.assert_allclose(rho, [1 / 1.05, 0.05 / 1.05])
    # the prior multiplies the rates: the same laws, prior 9:1 for the same rates
    rho, _ = ado_preference([steep, steep], [10.0, 10.0], [0.9, 0.1], [0.5, 0.5])
    np.testing.assert_allclose(rho, [0.9, 0.1])
    # every law flat: nothing to prefer, the prior
    rho, _ = ado_preference([flat, flat], [10.0, 10.0], [0.7, 0.3], [0.5, 0.5])
    np.testing.assert_allclose(rho, [0.7, 0.3])
    with pytest.raises(ValueError, match="n must be > 0"):
        ado_preference([steep, flat], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5])


def test_credit_is_an_ema_of_the_batch_composition() -> None:
    config = ADOConfig(num_groups=2, prior=(0.5, 0.5), warmup_steps=5, ignore_steps=0)
    state = ADOState.initial(config)
    state.observe(config, [30.0, 10.0], [3.0, 4.0])
    assert state.credit == pytest.approx([0.9 * 0.5 + 0.1 * 0.75, 0.9 * 0.5 + 0.1 * 0.25])
    state.observe(config, [40.0, 0.0], [2.9, math.nan])
    np.testing.assert_allclose(state.seen(config)[:, 0], [40.0, 80.0])  # total
    group = ADOConfig(num_groups=2, warmup_steps=5, ignore_steps=0, counts="group")
    np.testing.assert_allclose(state.seen(group), [[30.0, 10.0], [70.0, 10.0]])


def test_ado_follows_the_group_whose_loss_still_falls() -> None:
    # Planted laws of the data seen: group 0 has plateaued, group 1 still learns.
    config = ADOConfig(num_groups=2, warmup_steps=20, ignore_steps=5, fit_interval=10)
    laws = [PowerLaw(eps=3.0, beta=1.0, alpha=0.8), PowerLaw(eps=1.0, beta=30.0, alpha=0.3)]
    state = ADOState.initial(config)
    weights = np.array(config.initial_weights())
    mixtures = []
    for step in range(1, 61):
        tokens = np.round(64 * weights)
        n = sum(sum(r) for r in state.tokens) + tokens.sum()
        losses = [law(n) for law in laws]
        mixture = ado_update(config, state, step, tokens, losses)
        if step < 20:
            assert mixture is None  # the prior until warmup_steps
        else:
            assert mixture is not None
            weights = mixture
            mixtures.append(mixture)
    assert state.fits == 5  # at 20, 30, 40, 50, 60
    assert all(m[1] > 0.5 for m in mixtures) and mixtures[-1][1] > mixtures[0][1]
    for law, fitted in zip(laws, state.laws or [], strict=True):
        assert fitted is not None and fitted[2] == pytest.approx(law.alpha, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_groups": 1}, "num_groups must be >= 2"),
        ({"warmup_steps": 0}, "warmup_steps must be >= 1"),
        ({"warmup_steps": 10, "ignore_steps": 8}, "must exceed ignore_steps=8 by at least 3"),
        ({"fit_interval": 0}, "fit_interval must be >= 1"),
        ({"policy_ema": 1.0}, r"policy_ema must be in \[0, 1\)"),
        ({"credit_ema": -0.1}, r"credit_ema must be in \[0, 1\)"),
        ({"credit_power": -1.0}, "credit_power must be a finite number >= 0"),
        ({"min_prob": 0.6}, "min_prob=0.6 is more than 1/num_groups"),
        ({"max_exponent": 0.0}, "max_exponent must be a finite number > 0"),
        ({"min_exponent": 0.9}, r"min_exponent must be in \[0, max_exponent=0.8\]"),
        ({"counts": "tokens"}, "counts must be one of total, group"),
        ({"prior": (1.0, 2.0, 3.0)}, "prior has 3 weights for 2 groups"),
        ({"prior": (-1.0, 2.0)}, "prior must be >= 0"),
    ],
)
def test_bad_settings_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ADOConfig(**{"num_groups": 2, **kwargs})


def test_fit_schedule_and_state_round_trip() -> None:
    config = ADOConfig(num_groups=2, warmup_steps=6, ignore_steps=1, fit_interval=4)
    assert [s for s in range(1, 20) if config.fits_at(s)] == [6, 10, 14, 18]
    state = ADOState.initial(config)
    for step in range(1, 9):
        ado_update(config, state, step, [16.0, 16.0], [3.0 / step**0.3, 2.0 / step**0.1])
    clone = ADOState.from_state_dict(state.state_dict())
    assert clone.state_dict() == state.state_dict()
    a = ado_update(config, clone, 9, [16.0, 16.0], [2.0, 1.8])
    b = ado_update(config, state, 9, [16.0, 16.0], [2.0, 1.8])
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)
